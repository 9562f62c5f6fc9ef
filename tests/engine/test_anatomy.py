"""Depth / window anatomy (method 4.8) on constructed organisms whose mechanism sits at a known block.

Five blocks, boundary 3 (late stack = blocks 3-4). `llama_mediated` plants the u-gated neurons in block 4
only (the final block), `llama_first_late_block` in block 3 only; in both, every other late weight is PT's.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from crosspatch.engine.anatomy import anatomy, depth_bands
from crosspatch.engine.control_schemas import ANATOMY_EVENTS_SCHEMA, ANATOMY_SCHEMA
from crosspatch.engine.control_suite import format_controls
from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.organisms import constructed as cons
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.prompts import load_prompts

N_PROMPTS = 10


@functools.cache
def _run(name: str):
    """(pair, events, per-event table, {(statistic, k, band): row}, summary) of organism `name`, windows 3 and 1."""
    root = organism_path(name)
    pair = load_pair(root / "pt", root / "it")
    events = [
        e for e in find_divergences(pair, load_prompts(root / "prompts.jsonl", limit=N_PROMPTS)) if e.diverged
    ]
    per_event, summary = anatomy(pair, events, windows=(3, 1), batch_size=6, n_resamples=200)
    assert per_event.schema == ANATOMY_EVENTS_SCHEMA and summary.schema == ANATOMY_SCHEMA
    rows = {(r["statistic"], r["k"], r["band"]): r for r in summary.to_pylist()}
    return pair, events, per_event, rows, summary


def _event_values(per_event, measure: str, k: int) -> np.ndarray:
    return np.array([r["value"] for r in per_event.to_pylist() if r["measure"] == measure and r["k"] == k])


def test_depth_bands_split_upstream_in_two() -> None:
    assert depth_bands(3, 5) == {"early": (0, 2), "middle": (2, 3), "late": (3, 5)}
    assert depth_bands(19, 32) == {"early": (0, 10), "middle": (10, 19), "late": (19, 32)}
    assert depth_bands(1, 4)["middle"] == (1, 1)  # empty: reported not valid


def test_final_block_mechanism_is_fully_retained() -> None:
    """`mediated`: the final block alone carries the whole interaction, through its MLP."""
    pair, events, per_event, rows, summary = _run("llama_mediated")
    cells = crosspatch(pair, events, check_noop=False)
    means = {
        c: float(np.mean(cells.column(c).to_numpy())) for c in cells.column_names if c.startswith(("y_", "i"))
    }
    full = rows[("full_late_interaction", 2, None)]
    # the full-late interaction is the 2x2's, computed from the same late stacks
    assert full["estimate"] == pytest.approx(means["interaction"], abs=1e-6) and full["n"] == N_PROMPTS
    # block 3 is PT's in both models, so patching only block 4's input gives the same interaction
    assert rows[("final_k_retention", 1, None)]["estimate"] == pytest.approx(1.0, abs=1e-6)
    # zeroing block 4's MLPs leaves two identical late stacks: the final-MLP margin interaction is all of it
    np.testing.assert_allclose(
        _event_values(per_event, "final_mlp_interaction", 1),
        _event_values(per_event, "full_late_interaction", 2),
        atol=1e-9,
    )
    # a window longer than the late stack is reported, not dropped
    k3 = rows[("final_k_retention", 3, None)]
    assert not k3["valid"] and "k must be 1..2" in k3["reason"]
    # MLP support in pure IT: block 0's u neuron (early) carries the native diagonal shift, block 2 nothing,
    # the late MLPs the IT-upstream late effect plus what the background neurons both late stacks share add
    # under IT's upstream (by the construction, per scored word; the noise MLPs move it by < 0.01)
    support = {band: rows[("mlp_support", None, band)]["estimate"] for band in ("early", "middle", "late")}
    assert support["early"] == pytest.approx(means["y_itup_itlate"] - means["y_ptup_ptlate"], abs=0.1)
    assert abs(support["middle"]) < 0.05
    con = cons.make_construction("mediated", "llama", 0)
    no_background = dataclasses.replace(con, base_neurons=[])
    shared = np.mean(
        [
            cons.nominal_cells(con, word=e.input_ids[-1])["y_itup_ptlate"]
            - cons.nominal_cells(no_background, word=e.input_ids[-1])["y_itup_ptlate"]
            for e in events
        ]
    )
    assert shared > 0.3  # the background's norm shrinks the margin toward t_PT: a real share to account for
    assert support["late"] == pytest.approx(means["it_late_effect"] + shared, abs=0.05)
    text = format_controls({"anatomy": summary})
    assert "final_k_retention k=1" in text and "+1.000" in text and "not valid" in text


def test_earlier_mechanism_is_not_retained_by_the_final_block() -> None:
    """`first_late_block`: block 4 is PT's in both models, so the final block alone retains exactly 0."""
    _, _, per_event, rows, _ = _run("llama_first_late_block")
    assert rows[("full_late_interaction", 2, None)]["estimate"] > 10
    assert np.all(_event_values(per_event, "final_k_interaction", 1) == 0.0)
    assert rows[("final_k_retention", 1, None)]["estimate"] == 0.0
    # the final MLPs add (almost) nothing that depends on upstream x late weights
    full = rows[("full_late_interaction", 2, None)]["estimate"]
    assert abs(rows[("final_mlp_interaction", 1, None)]["estimate"]) < 0.01 * full
