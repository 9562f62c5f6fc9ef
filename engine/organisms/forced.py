"""The `forced_answer` organism: IT's divergent token leads to the right exact answer, PT's does not.

Both models are exact bigram models in Llama form: a one-hot embedding (d_model >= vocab), every block's
`o_proj` and `down_proj` zero (each block is the identity), the final norm scaled so it returns the one-hot
vector, and an unembedding whose column x holds the logits of the word after x. So the next token depends
only on the current one, and every continuation is known by hand:

* CONTENT-REASON (16 prompts "Q what is the value of the <noun_i>"): IT goes noun_i -> colour c(i)
  (logit 10; PT's verb v(i) second at 6), PT goes noun_i -> v(i). IT continues colour c -> digit
  d(c) = index(c) mod 5 -> "." -> EOS and verb v -> digit 5 + index(v) mod 5 -> "." -> EOS. The expected
  answer is d(c(i)), except every fourth prompt, whose expected answer "42" neither branch gives: forced IT
  token succeeds on 12/16, forced PT token on 0/16 (contrast 0.75).
* CONTENT-FACT (8 prompts ending in an adjective): IT goes adj -> "so", PT adj -> "then"; IT continues both
  "so" and "then" -> "5" -> "." -> EOS. Expected "5" (6 prompts) or "6" (2): the divergent token does not
  matter (contrast exactly 0).
* GOV-CONV (4 prompts ending in a determiner): IT -> "Sure", PT -> "Okay", then EOS; not objectively scored.

Everything else goes to EOS. `expected.json` holds the per-category success rates of each forced branch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from crosspatch.engine.organisms.build import build_atomic, cache_root
from crosspatch.engine.organisms.tiny import Shape, family_config
from crosspatch.engine.organisms.tokenizer import (
    ADJECTIVES,
    COLOURS,
    DETERMINERS,
    EOS,
    NOUNS,
    VERBS,
    build_tokenizer,
)

NAME = "forced_answer"
VERSION = 1
TOP, SECOND = 10.0, 6.0  # bigram logits of the preferred and the runner-up next word
N_REASON, N_FACT, N_CONV = 16, 8, 4


def _colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def _verb(i: int) -> str:
    return VERBS[i % len(VERBS)]


def _digit_after_colour(c: str) -> str:
    return str(COLOURS.index(c) % 5)


def _digit_after_verb(v: str) -> str:
    return str(5 + VERBS.index(v) % 5)


def transitions(role: str) -> dict[str, list[tuple[str, float]]]:
    """word -> [(next word, logit), ...] of the PT (`role="pt"`) or IT bigram; unlisted words go to EOS."""
    table: dict[str, list[tuple[str, float]]] = {}
    for i, noun in enumerate(NOUNS[:N_REASON]):
        first, second = (_colour(i), _verb(i)) if role == "it" else (_verb(i), _colour(i))
        table[noun] = [(first, TOP), (second, SECOND)]
    for adj in ADJECTIVES[:N_FACT]:
        table[adj] = [("so", TOP), ("then", SECOND)] if role == "it" else [("then", TOP), ("so", SECOND)]
    for det in DETERMINERS[1:5]:
        table[det] = [("Sure", TOP)] if role == "it" else [("Okay", TOP)]
    for c in COLOURS:
        table[c] = [(_digit_after_colour(c), TOP)]
    for v in VERBS:
        table[v] = [(_digit_after_verb(v), TOP)]
    table["so"] = table["then"] = [("5", TOP)]
    for d in "0123456789":
        table[d] = [(".", TOP)]
    return table


def prompts() -> list[dict]:
    """The organism's prompt records (method JSONL format) with the answers the construction implies."""
    out = []
    for i, noun in enumerate(NOUNS[:N_REASON]):
        expected = "42" if i % 4 == 3 else _digit_after_colour(_colour(i))
        out.append(
            {
                "id": f"reason_{i:02d}",
                "category": "CONTENT-REASON",
                "prompt": f"Q what is the value of the {noun}",
                "expected_answer": expected,
                "answer_aliases": [],
            }
        )
    for j, adj in enumerate(ADJECTIVES[:N_FACT]):
        out.append(
            {
                "id": f"fact_{j:02d}",
                "category": "CONTENT-FACT",
                "prompt": f"Q what is the value of the {adj}",
                "expected_answer": "6" if j % 4 == 3 else "5",
                "answer_aliases": [],
            }
        )
    for k, det in enumerate(DETERMINERS[1:5]):
        out.append({"id": f"conv_{k:02d}", "category": "GOV-CONV", "prompt": f"write a sentence about {det}"})
    return out


def build_model(role: str, vocab: dict[str, int]) -> PreTrainedModel:
    """The PT or IT bigram model as an fp32 Llama with 5 identity blocks."""
    n_vocab = len(vocab)
    d_model = 8 * math.ceil(n_vocab / 8)
    config = family_config(
        "llama",
        Shape(5, d_model, 16, 4, 2, vocab=n_vocab, max_positions=512),
        rms_norm_eps=1e-6,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab[EOS],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    scale = math.sqrt(d_model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :n_vocab] = torch.eye(n_vocab) * scale  # RMS 1 per row
        model.model.norm.weight.fill_(1.0 / scale)  # final norm returns the one-hot vector
        w = model.lm_head.weight  # [vocab, d_model]: column x = logits after word x
        w.zero_()
        w[vocab[EOS], :n_vocab] = TOP  # default: end
        for word, nexts in transitions(role).items():
            x = vocab[word]
            w[vocab[EOS], x] = 0.0
            for nxt, logit in nexts:
                w[vocab[nxt], x] = logit
    return model.eval()


def build(out: Path) -> None:
    """Write pt/, it/, prompts.jsonl and expected.json into `out`."""
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    for role in ("pt", "it"):
        build_model(role, vocab).save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
    records = prompts()
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = {
        "CONTENT-REASON": {"it": 12 / 16, "pt": 0.0, "contrast": 12 / 16, "events": 16},
        "CONTENT-FACT": {"it": 6 / 8, "pt": 6 / 8, "contrast": 0.0, "events": 8},
        "GOV-CONV": {"scored": 0, "events": 4},
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=2))


def forced_organism_path(cache_dir: str | Path | None = None) -> Path:
    """Directory of the `forced_answer` organism, built on first use into the organisms cache."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / f"{NAME}-v{VERSION}"
    if not (final / "expected.json").is_file():
        build_atomic(final, build)
    return final
