"""Divergence fused with the 2x2: cells from the decoding pass's captures equal the unfused 2x2 on every family,
and continuous batching gives the lockstep events on every family."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_prompts, tiny_pair
from test_continuous import assert_same_events

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import find_divergences, iter_divergences
from crosspatch.engine.noop import noop_report
from crosspatch.engine.organisms.tiny import FAMILIES
from crosspatch.engine.results import CELL_COLUMNS


def _events(pair, prompts, **kw):
    return [e for chunk in iter_divergences(pair, prompts, 9, 3, **kw) for e in chunk]


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_cells_equal_unfused_and_pass_the_noop_checks(family):
    pair = tiny_pair(family, it_scale=0.004, seed=5)
    prompts = random_prompts(8, seed=6)
    bounds = [1, 3, pair.n_layers]  # n_layers: the late stack is empty, every cell is a diagonal
    fused = _events(pair, prompts, capture=bounds)  # continuous batching, capturing
    plain = find_divergences(pair, prompts, 9, 3, continuous=False)  # lockstep batches, no capture
    assert_same_events(plain, fused)  # continuous == lockstep, event for event
    scored = [e for e in fused if e.diverged]
    assert len(scored) >= 4 and all(e.capture is not None for e in scored)
    assert all(e.capture is None for e in fused if not e.diverged)
    a = crosspatch(pair, fused, bounds, ("it", "pt", "own"), batch_size=4)
    assert all(e.capture is None for e in fused)  # consumed: the fused path ran
    b = crosspatch(pair, plain, bounds, ("it", "pt", "own"), batch_size=4)
    assert a.num_rows == b.num_rows == len(scored) * 9
    for col in CELL_COLUMNS:
        assert np.abs(a[col].to_numpy() - b[col].to_numpy()).max() < 1e-4, col
    report = noop_report(a)  # the first (fused) batch was no-op checked against HF forwards
    assert report is not None and max(report["max_abs_diff"].values()) < report["tolerance"]


def test_capture_budget_falls_back_to_unfused_and_bad_options_raise():
    pair = tiny_pair("llama", it_scale=0.004, seed=5)
    prompts = random_prompts(6, seed=6)
    events = _events(pair, prompts, capture=[2], max_capture_bytes=0)
    assert any(e.diverged for e in events) and all(e.capture is None for e in events)
    with pytest.raises(ValueError, match="continuous"):
        _events(pair, prompts, capture=[2], continuous=False)
