"""Identity transfer (method 4.8) on constructed organisms whose mechanism sits in known blocks.

Five blocks, boundary 3: windows early = blocks 0-1, middle = 2-3, late = 3-4 (blocks), MLPs late = 3-4,
final_3 = 2-4, final_1 = 4. `llama_self_contained` plants an always-on push toward t_IT in block 4 only;
`llama_mediated` writes u in block 0 and reads it with u-gated neurons in block 4 (silu(0) = 0 without u).
Blocks without a plant are identical in PT and IT, so grafting them changes nothing, exactly.
"""

from __future__ import annotations

import functools

import pytest

from crosspatch.engine.control_schemas import IDENTITY_TRANSFER_EVENTS_SCHEMA, IDENTITY_TRANSFER_SCHEMA
from crosspatch.engine.control_suite import format_controls
from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.identity_transfer import identity_transfer, transfer_windows
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.prompts import load_prompts

N_PROMPTS = 8


@functools.cache
def _run(name: str):
    """(per-event table, {(host, graft, window, statistic): row}, summary) of organism `name`."""
    root = organism_path(name)
    pair = load_pair(root / "pt", root / "it")
    events = find_divergences(pair, load_prompts(root / "prompts.jsonl", limit=N_PROMPTS))
    per_event, summary = identity_transfer(pair, events, mlp_windows=(3, 1, 6), batch_size=4, n_resamples=200)
    assert per_event.schema == IDENTITY_TRANSFER_EVENTS_SCHEMA and summary.schema == IDENTITY_TRANSFER_SCHEMA
    rows = {(r["host"], r["graft"], r["window_name"], r["statistic"]): r for r in summary.to_pylist()}
    return per_event, rows, summary


def _gains(per_event, host: str, graft: str, window: str) -> list[float]:
    return [
        r["margin_gain"]
        for r in per_event.to_pylist()
        if (r["host"], r["graft"], r["window_name"]) == (host, graft, window)
    ]


def test_windows_scale_with_depth() -> None:
    """The block windows are engine.handoff's, scaled to L with terminal L; final_k past L is reported."""
    spans = {(g, n): (s, reason) for g, n, s, reason in transfer_windows(32, 19, (3, 40))}
    assert spans[("blocks", "early")] == ((0, 13), None) and spans[("blocks", "middle")] == ((10, 22), None)
    assert spans[("blocks", "late")] == ((19, 32), None) and spans[("mlp", "final_3")] == ((29, 32), None)
    assert spans[("mlp", "late")] == ((19, 32), None) and "k <= 32" in spans[("mlp", "final_40")][1]


def test_the_window_holding_a_portable_push_transfers_identity() -> None:
    """`self_contained`: the late window (block 4) moves every event to the donor's token, both ways; the
    middle window (blocks 2-3, identical in both models) moves none and changes Y by exactly 0."""
    per_event, rows, summary = _run("llama_self_contained")
    for host in ("pt", "it"):
        for graft, window in (("blocks", "late"), ("mlp", "late"), ("mlp", "final_3"), ("mlp", "final_1")):
            row = rows[(host, graft, window, "transfer_rate")]
            assert row["estimate"] == 1.0 and row["n"] == N_PROMPTS, (host, graft, window)
            assert rows[(host, graft, window, "margin_gain")]["estimate"] > 10
        for window in ("early", "middle"):
            assert rows[(host, "blocks", window, "transfer_rate")]["estimate"] == 0.0
            assert _gains(per_event, host, "blocks", window) == [0.0] * N_PROMPTS
    bad = rows[("pt", "mlp", "final_6", "transfer_rate")]
    assert not bad["valid"] and bad["reason"] == "final_6 needs 1 <= k <= 5 blocks"
    text = format_controls({"identity_transfer": summary})
    assert "pt host blocks late transfer_rate" in text and "+1.000" in text and "not valid: final_6" in text


def test_an_upstream_dependent_mechanism_transfers_only_with_its_upstream() -> None:
    """`mediated`: IT's late block alone cannot move the PT host (no u: the gated neurons are exactly 0),
    so the PT-host late transfer is 0 and its late-MLP margin gain exactly 0; in the IT host, removing
    either the u writer (early window) or the readers (late window) gives PT's token on every event."""
    per_event, rows, _ = _run("llama_mediated")
    for graft, window in (("blocks", "late"), ("mlp", "late"), ("mlp", "final_3"), ("blocks", "middle")):
        assert rows[("pt", graft, window, "transfer_rate")]["estimate"] == 0.0
        assert _gains(per_event, "pt", graft, window) == [0.0] * N_PROMPTS
    for window in ("early", "late"):
        assert rows[("it", "blocks", window, "transfer_rate")]["estimate"] == 1.0
    assert rows[("it", "blocks", "middle", "transfer_rate")]["estimate"] == 0.0
    assert rows[("it", "blocks", "late", "margin_gain")]["estimate"] == pytest.approx(
        rows[("it", "mlp", "late", "margin_gain")]["estimate"], abs=1e-6
    )  # block 4's attention is the same in both models: the whole-block and MLP grafts agree
