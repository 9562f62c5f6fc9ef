"""The organisms' shared word-level tokenizer over a small synthetic vocabulary.

Every organism (constructed, trained, tiny) uses this one tokenizer, so PT and IT of a pair share token
ids by construction. Encoding adds a BOS like Llama's tokenizer does, so the engine's
`tokenizer.encode(prompt, add_special_tokens=True)` path is exercised exactly as on real checkpoints.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # ids 0..3, matching `tiny.tiny_config`

# The words IT organisms answer with. Constructed organisms use them as t_IT; trained IT models learn them
# as polite prefixes and sign-offs.
ANSWER_WORDS: tuple[str, ...] = ("Sure", "Certainly", "Yes", "Okay")

DETERMINERS = ("the", "a", "every", "some", "this", "that")
NOUNS = (
    "cat",
    "dog",
    "bird",
    "fish",
    "fox",
    "owl",
    "frog",
    "bear",
    "wolf",
    "mouse",
    "horse",
    "goat",
    "tree",
    "river",
    "stone",
    "house",
    "garden",
    "road",
    "hill",
    "cloud",
)
VERBS = ("sees", "likes", "finds", "follows", "helps", "watches", "chases", "meets", "hears", "greets")
ADJECTIVES = ("small", "big", "quick", "slow", "happy", "quiet", "old", "young", "bright", "dark")
COLOURS = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "pink",
    "brown",
    "grey",
    "gold",
)
DIGITS = tuple(str(i) for i in range(10))
FUNCTION_WORDS = (
    "Q",
    "A",
    "what",
    "is",
    "are",
    "of",
    "and",
    "answer",
    "sentence",
    "about",
    "write",
    "recall",
    "value",
    "key",
    "plus",
    "minus",
    "equals",
    "please",
    "Thank",
    "you",
    "Hope",
    "this",
    "helps",
    "Here",
    "here",
    "Anything",
    "else",
    "Of",
    "course",
    "Great",
    "question",
    "glad",
    "to",
    "help",
    "it",
    "so",
    "then",
    "was",
    "with",
    "in",
    "on",
    "by",
    "near",
    "under",
    "over",
)
PUNCTUATION = (".", ",", ":", "?", "!", "+", "-", "=", ";", "(", ")")


def vocabulary() -> list[str]:
    """All tokens in id order: specials first, then answers, then content words, digits, punctuation."""
    words: list[str] = [*SPECIAL_TOKENS, *ANSWER_WORDS]
    for group in (DETERMINERS, NOUNS, VERBS, ADJECTIVES, COLOURS, DIGITS, FUNCTION_WORDS, PUNCTUATION):
        words.extend(w for w in group if w not in words)
    return words


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with `<s>` prepended on encode and digits split one per token."""
    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
    )
