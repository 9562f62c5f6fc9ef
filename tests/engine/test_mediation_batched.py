"""Mediation's stacked runs: one forward for many edit sets equals one forward per set (the method's passes)."""

from __future__ import annotations

import torch
from helpers import random_prompts, tiny_pair

from crosspatch.engine.controls import random_directions
from crosspatch.engine.crosspatch import clean_passes, event_batches
from crosspatch.engine.mediation import (
    DirectionDictionary,
    _ablate_edit,
    _rescue_edit,
    it_late_margin,
    it_late_margins,
)
from crosspatch.engine.organisms.tiny import forced_events


def test_stacked_runs_equal_one_pass_per_run_in_every_chunking():
    pair = tiny_pair("gemma3", it_scale=0.05, seed=2)  # sliding + full layers, left-padded batch
    events = forced_events(pair, random_prompts(5, seed=3))
    _, ids, mask, tokens = next(event_batches(pair, events, 8))
    b, d_model = 1, pair.it_adapter.d_model
    g = torch.Generator().manual_seed(0)
    dicts = [
        DirectionDictionary(
            f"d{layer}", layer, torch.nn.functional.normalize(torch.randn(16, d_model, generator=g))
        )
        for layer in (3, 4)
    ]
    passes = clean_passes(pair, ids, mask, [b])
    ids_ = [e.prompt_id for e in events]
    runs = []
    for i, feats in enumerate(([0, 1], [2], [3, 4, 5], [6])):
        idx = torch.tensor(feats)
        groups = {d.layer: [(d, idx)] for d in dicts[: 1 + i % 2]}  # some runs edit layer 3 only
        dirs = None if i != 2 else {L: random_directions(ids_, 7, L, d_model) for L in groups}
        runs.append({L: _ablate_edit(groups, None, dirs) for L in groups})
        target = {d.layer: {d.id: torch.rand(len(events), 16, generator=g)} for d in dicts}
        runs.append({L: _rescue_edit(groups, target, 0.5, dirs) for L in groups})
    runs.append({})  # no edit: the clean IT-late cell
    for up in ("it", "pt"):
        one_by_one = [it_late_margin(pair, up, passes, b, tokens, run) for run in runs]
        for max_rows in (512, 7, 1):  # all runs in one forward; 1 run per forward
            stacked = it_late_margins(pair, up, passes, b, tokens, mask, runs, max_rows=max_rows)
            assert len(stacked) == len(runs)
            for x, y in zip(stacked, one_by_one, strict=True):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        assert (one_by_one[0] - one_by_one[-1]).abs().max() > 1e-3  # the edits do move the margin
