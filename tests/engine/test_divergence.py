"""First divergence: equals greedy `generate` on both models compared afterwards; edge cases."""

from __future__ import annotations

import pytest
import torch
from helpers import random_prompts, tiny_pair
from transformers import LogitsProcessor, LogitsProcessorList

from crosspatch.engine.divergence import (
    DIVERGED,
    EOS_BEFORE_DIVERGENCE,
    NO_DIVERGENCE_IN_BUDGET,
    eos_ids,
    find_divergences,
    real_token_mask,
)


class _Mask(LogitsProcessor):
    def __init__(self, mask: torch.Tensor) -> None:
        self.neg = torch.where(mask, 0.0, float("-inf"))

    def __call__(self, input_ids, scores):
        return scores + self.neg[: scores.shape[-1]]


def _generate(model, tokenizer, ids: list[int], n: int) -> list[int]:
    mask = real_token_mask(model, tokenizer)
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        logits_processor=LogitsProcessorList([_Mask(mask)]),
        eos_token_id=eos_ids(model, tokenizer),
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def _reference(pair, prompt, n):
    """Generate-then-compare, the way a notebook would do it."""
    ids = pair.tokenizer.encode(prompt.text)
    a, c = _generate(pair.pt, pair.tokenizer, ids, n), _generate(pair.it, pair.tokenizer, ids, n)
    eos = set(eos_ids(pair.pt, pair.tokenizer))
    for step in range(n):
        x = a[step] if step < len(a) else None
        y = c[step] if step < len(c) else None
        if x != y:
            return DIVERGED, step, x, y, a[:step]
        if x in eos:
            return EOS_BEFORE_DIVERGENCE, None, None, None, a[:step]
    return NO_DIVERGENCE_IN_BUDGET, None, None, None, a[:n]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_lockstep_equals_generate_then_compare(family):
    pair = tiny_pair(family, it_scale=0.02, seed=3)
    prompts = random_prompts(12, seed=4)
    events = find_divergences(pair, prompts, max_new_tokens=10, batch_size=5)
    assert [e.prompt_id for e in events] == [p.id for p in prompts]
    for ev, prompt in zip(events, prompts, strict=True):
        reason, position, t_pt, t_it, prefix = _reference(pair, prompt, 10)
        assert (ev.reason, ev.position, ev.t_pt, ev.t_it) == (reason, position, t_pt, t_it), prompt.id
        assert ev.prefix_ids == prefix
    assert sum(e.diverged for e in events) >= 3
    assert any(e.position and e.position > 0 for e in events if e.diverged)


def test_identical_models_never_diverge_and_say_why():
    pair = tiny_pair("llama", it_scale=0.0)
    events = find_divergences(pair, random_prompts(6), max_new_tokens=5, batch_size=4)
    assert all(not e.diverged for e in events)
    assert {e.reason for e in events} <= {NO_DIVERGENCE_IN_BUDGET, EOS_BEFORE_DIVERGENCE}
    assert all(len(e.prefix_ids) <= 5 for e in events)


def test_shared_eos_stops_without_event():
    pair = tiny_pair("llama", it_scale=0.0)  # IT is PT
    with torch.no_grad():  # all logits 0: argmax is the first allowed id, 2 = EOS (0, 1 are masked)
        pair.pt.model.norm.weight.zero_()
    events = find_divergences(pair, random_prompts(3), max_new_tokens=5)
    assert [e.reason for e in events] == [EOS_BEFORE_DIVERGENCE] * 3


def test_real_token_mask_blocks_padding_rows_and_specials():
    pair = tiny_pair("llama")
    mask = real_token_mask(pair.pt, pair.tokenizer)
    assert not mask[0] and not mask[1]  # pad, bos
    assert mask[2]  # eos stays allowed
    assert mask[3:].all()
