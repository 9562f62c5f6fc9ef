"""Continuous batching in divergence: the same events as lockstep batches, event for event.

Every random family is checked in tests/engine/test_fused.py (one decode per schedule serves both checks).
"""

from __future__ import annotations

import pytest

from crosspatch.engine.divergence import DIVERGED, find_divergences, iter_divergences
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.prompts import load_prompts


def _key(events):
    return [
        (e.prompt_id, e.reason, e.position, e.t_pt, e.t_it, e.prefix_ids, e.near_tie, e.token_check)
        for e in events
    ]


def assert_same_events(lockstep, continuous):
    assert _key(continuous) == _key(lockstep)
    for x, y in zip(lockstep, continuous, strict=True):
        if x.diverged:  # the gaps come from differently padded batches: equal up to fp32 rounding
            assert y.gap_pt == pytest.approx(x.gap_pt, abs=1e-4)
            assert y.gap_it == pytest.approx(x.gap_it, abs=1e-4)


def test_continuous_equals_lockstep_on_trained_organism_and_streams_in_order():
    root = organism_path("trained_llama")
    pair = load_pair(root / "pt", root / "it")
    prompts = load_prompts(root / "prompts.jsonl", limit=24)
    lock = find_divergences(pair, prompts, max_new_tokens=24, batch_size=4, continuous=False)
    seen: list[tuple[int, int]] = []
    chunks = list(iter_divergences(pair, prompts, 24, 4, on_batch=lambda d, n: seen.append((d, n))))
    assert_same_events(lock, [e for c in chunks for e in c])
    assert [len(c) for c in chunks] == [4] * 6 and seen == [(4 * i, 24) for i in range(1, 7)]
    positions = [e.position for e in lock if e.reason == DIVERGED]
    assert len(positions) >= 12 and max(positions) - min(positions) >= 3  # rows finish at different steps
