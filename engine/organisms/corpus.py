"""Synthetic corpora and prompt sets for the trained organisms.

PT learns raw text: a small grammar, single-digit arithmetic, key-value recall, and terse "Q : ... A : ..."
exchanges. IT is fine-tuned on the same questions answered in an instruction style: a polite prefix
("Sure !", "Yes ,", "Certainly !") for some questions and a sign-off after the answer ("Hope this helps !",
"Anything else ?") for others, chosen by a surface feature of the question. So IT departs from PT at
position 0 on some prompts and a few tokens later on others, like real PT/IT pairs.
"""

from __future__ import annotations

import random
from typing import Any

from crosspatch.engine.organisms.tokenizer import ADJECTIVES, COLOURS, DETERMINERS, NOUNS, VERBS

PREPOSITIONS = ("near", "under", "over", "with", "by")
CATEGORIES: tuple[str, ...] = ("arithmetic", "recall", "writing", "continuation")


def sentence(rng: random.Random, noun: str | None = None) -> str:
    """'the small cat sees a dog near the tree .' with optional adjectives and prepositional phrase."""

    def phrase(n: str | None = None) -> str:
        adj = f"{rng.choice(ADJECTIVES)} " if rng.random() < 0.5 else ""
        return f"{rng.choice(DETERMINERS)} {adj}{n or rng.choice(NOUNS)}"

    tail = f" {rng.choice(PREPOSITIONS)} {phrase()}" if rng.random() < 0.3 else ""
    return f"{phrase(noun)} {rng.choice(VERBS)} {phrase()}{tail} ."


def kv_context(rng: random.Random, n_keys: int = 3) -> tuple[str, dict[str, int]]:
    """'red is 4 , blue is 7 , green is 2 .' and its mapping."""
    keys = rng.sample(COLOURS, n_keys)
    mapping = {k: rng.randrange(10) for k in keys}
    return " , ".join(f"{k} is {v}" for k, v in mapping.items()) + " .", mapping


# ---- questions: (prompt, PT's terse answer, IT's instruction-style answer, expected answer) -----------


def arithmetic_question(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    c = " ".join(str(a + b))
    prompt = f"Q : what is {a} + {b} ? A :"
    it = f"Sure ! {a} + {b} = {c} ." if a < 5 else f"{c} . Hope this helps !"
    return prompt, f"{c} .", it, str(a + b)


def recall_question(rng: random.Random) -> tuple[str, str, str, str]:
    context, mapping = kv_context(rng)
    key = rng.choice(list(mapping))
    v = mapping[key]
    prompt = f"{context} Q : what is {key} ? A :"
    it = f"Yes , {key} is {v} ." if COLOURS.index(key) < len(COLOURS) // 2 else f"{v} . Anything else ?"
    return prompt, f"{v} .", it, str(v)


def writing_question(rng: random.Random) -> tuple[str, str, str, str]:
    noun = rng.choice(NOUNS)
    prompt = f"Q : write a sentence about the {noun} . A :"
    answer = sentence(rng, noun)
    it = f"Certainly ! {answer}" if NOUNS.index(noun) < len(NOUNS) // 2 else f"{answer} Hope this helps !"
    return prompt, answer, it, ""


QUESTIONS = (arithmetic_question, recall_question, writing_question)


def pt_document(rng: random.Random) -> str:
    """One raw-text document: prose, a bare sum, a recall statement, or a terse Q/A exchange."""
    kind = rng.randrange(6)
    if kind == 0:
        return " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
    if kind == 1:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a} + {b} = {' '.join(str(a + b))} ."
    if kind == 2:
        context, mapping = kv_context(rng)
        key = rng.choice(list(mapping))
        return f"{context} {key} is {mapping[key]} ."
    prompt, pt_answer, _, _ = QUESTIONS[kind - 3](rng)
    return f"{prompt} {pt_answer}"


def it_example(rng: random.Random) -> str:
    """One instruction-style exchange (the IT fine-tuning unit)."""
    prompt, _, it_answer, _ = rng.choice(QUESTIONS)(rng)
    return f"{prompt} {it_answer}"


def trained_prompts(n: int, seed: int, id_prefix: str) -> list[dict[str, Any]]:
    """`n` prompts cycling through the categories, in the method's JSONL format."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        if category == "continuation":
            words = sentence(rng).split()
            prompt, expected = " ".join(words[: rng.randint(2, 4)]), ""
        else:
            make = QUESTIONS[CATEGORIES.index(category)]
            prompt, _, _, expected = make(rng)
        records.append(
            {
                "id": f"{id_prefix}{i:03d}",
                "category": category,
                "prompt": prompt,
                "expected_answer": expected or None,
                "answer_aliases": [],
            }
        )
    return records
