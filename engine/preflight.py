"""Token preflight (docs/method.md §1.1): an event is scored only if its tokens mean the same to both models.

A first divergence found by lockstep greedy decoding is kept for the 2x2 only if, for the pair's PT and
IT tokenizers and both readouts (common-PT and common-IT), every check passes, in this order:

    prompt_ids  the raw prompt encodes to the same ids under both tokenizers
    decode      every prefix token and both targets (t_pt, t_it) decode to the same string under both
    vocab       both targets are rows of each readout's unembedding
    mask        both targets are real tokens under each readout's real-token mask (vocab padding past
                len(tokenizer), `<unusedN>`, reserved specials, pad/BOS/UNK masked; EOS allowed)

An event that fails is not scored (`diverged` False, so the 2x2 never sees it) and stays in the events
table with reason `token_mismatch` and the failing check in `token_check`; its position and tokens are kept.
Example: an IT tokenizer with one added token that IT emits decodes to '' under PT's tokenizer (`decode`),
and the common-PT readout would read an untrained padding row for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from crosspatch.engine.pairs import ModelPair

if TYPE_CHECKING:
    from crosspatch.engine.divergence import DivergenceEvent

TOKEN_MISMATCH = "token_mismatch"
CHECK_PROMPT_IDS = "prompt_ids"
CHECK_DECODE = "decode"
CHECK_VOCAB = "vocab"
CHECK_MASK = "mask"
TOKEN_CHECKS: tuple[str, ...] = (CHECK_PROMPT_IDS, CHECK_DECODE, CHECK_VOCAB, CHECK_MASK)


class TokenPreflight:
    """The method's token checks for one pair; built once per run, applied per event."""

    def __init__(self, pair: ModelPair, masks: dict[str, torch.Tensor]) -> None:
        """`masks`: role ('pt', 'it') -> `[vocab rows]` real-token mask of that model's readout."""
        self.pair = pair
        self.masks = {role: m.cpu() for role, m in masks.items()}
        self.shared_tokenizer = pair.it_tokenizer is pair.tokenizer
        self._decoded: dict[int, bool] = {}

    def prompt_ids_match(self, text: str) -> bool:
        """True if both tokenizers encode the raw prompt `text` to identical ids."""
        if self.shared_tokenizer:
            return True
        a = self.pair.tokenizer.encode(text, add_special_tokens=True)
        return a == self.pair.it_tokenizer.encode(text, add_special_tokens=True)

    def decodes_equal(self, token_id: int) -> bool:
        """True if `token_id` decodes to the same string under PT's and IT's tokenizer (cached per id)."""
        if self.shared_tokenizer:
            return True
        if token_id not in self._decoded:
            self._decoded[token_id] = _decode(self.pair.tokenizer, token_id) == _decode(
                self.pair.it_tokenizer, token_id
            )
        return self._decoded[token_id]

    def failing_check(self, event: DivergenceEvent) -> str | None:
        """The first check a diverged event fails (see the module docstring), or None if it passes all."""
        targets = (event.t_pt, event.t_it)
        if any(t is None for t in targets):
            return CHECK_VOCAB  # one model stopped: a divergence without a token cannot be scored
        if not all(self.decodes_equal(t) for t in (*event.prefix_ids, *targets)):
            return CHECK_DECODE
        for mask in self.masks.values():
            if any(not 0 <= t < mask.shape[0] for t in targets):
                return CHECK_VOCAB
        for mask in self.masks.values():
            if not all(bool(mask[t]) for t in targets):
                return CHECK_MASK
        return None

    def apply(self, event: DivergenceEvent) -> DivergenceEvent:
        """Mark a diverged event that fails a check as unscored `token_mismatch` (in place; returns it)."""
        if event.diverged:
            check = self.failing_check(event)
            if check is not None:
                event.diverged, event.reason, event.token_check = False, TOKEN_MISMATCH, check
        return event


def _decode(tokenizer, token_id: int) -> str | None:
    """One id as text, specials included; None where the tokenizer has no such id."""
    try:
        return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except (IndexError, KeyError, OverflowError, TypeError, ValueError):
        return None
