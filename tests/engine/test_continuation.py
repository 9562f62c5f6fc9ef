"""Constrained continuation (§6.2): N=0 is the one-token 2x2; longer N teacher-forces real tails."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import paper_sized  # tests/helpers.py

from crosspatch.engine.continuation import (
    CONTINUATION_SCHEMA,
    continuation_table,
    summarize_continuation,
    token_log_probs,
)
from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.report import format_continuation


@functools.cache
def _run():
    pair, events = paper_sized(16)
    table = continuation_table(pair, events, ns=(0, 1, 2, 4), batch_size=5)
    return pair, events, table


def test_n0_equals_the_one_token_interaction() -> None:
    pair, events, table = _run()
    assert table.schema == CONTINUATION_SCHEMA
    cells = crosspatch(pair, events).to_pylist()
    n0 = {r["prompt_id"]: r for r in table.to_pylist() if r["n"] == 0 and r["variant"] == "native"}
    assert len(n0) == len(cells) == 16
    for c in cells:
        r = n0[c["prompt_id"]]
        assert r["interaction"] == pytest.approx(c["interaction"], abs=1e-5)
        assert r["c_ptup_ptlate"] == pytest.approx(c["y_ptup_ptlate"], abs=1e-5)
        assert r["c_itup_ptlate"] == pytest.approx(c["y_itup_ptlate"], abs=1e-5)
        assert r["tail_interaction"] == 0.0
        # every variant forces the same two first tokens, so they all agree at N = 0
    by_variant = {}
    for r in table.to_pylist():
        if r["n"] == 0:
            by_variant.setdefault(r["prompt_id"], set()).add(round(r["interaction"], 9))
    assert all(len(v) == 1 for v in by_variant.values())


def test_tails_are_greedy_and_sequence_margin_adds_up() -> None:
    """Each candidate's tail is its model's greedy tail, and C_N = C_0 + tail-only C_N per cell."""
    pair, events, table = _run()
    rows = table.to_pylist()
    ev = {e.prompt_id: e for e in events}
    for r in rows:
        if r["variant"] != "native" or r["n"] == 0:
            continue
        e = ev[r["prompt_id"]]
        # greedy check through the diagonal cells' own readout: each tail token is the argmax
        assert r["it_candidate"][0] == e.t_it and r["pt_candidate"][0] == e.t_pt
        n0 = next(x for x in rows if (x["prompt_id"], x["n"], x["variant"]) == (r["prompt_id"], 0, "native"))
        for key in ("ptup_ptlate", "ptup_itlate", "itup_ptlate", "itup_itlate"):
            assert r[f"c_{key}"] == pytest.approx(n0[f"c_{key}"] + r[f"tail_{key}"], abs=1e-9)
    # the descendant candidate's tail is IT's own greedy decoding after t_IT (HF generate, no cache tricks)
    for r in [x for x in rows if x["variant"] == "native" and x["n"] == 4][:3]:
        e = ev[r["prompt_id"]]
        ids = torch.tensor([[*e.input_ids, e.t_it]])
        out = pair.it.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert out[0, ids.shape[1] :].tolist() == r["it_candidate"][1:]
    lp = token_log_probs(pair, [events[0].input_ids], [[events[0].t_it]], 3, "own")
    assert all(v[0].shape == (1,) and v[0][0] <= 0 for v in lp.values())


def test_controls_and_summary() -> None:
    _, _, table = _run()
    summary = summarize_continuation(table, n_resamples=500).to_pylist()
    got = {(r["variant"], r["n"], r["statistic"]): r for r in summary}
    assert got[("native", 0, "interaction")]["n_events"] == 16
    assert ("native", 0, "tail_interaction") not in got
    text = format_continuation(summarize_continuation(table, n_resamples=500))
    assert "native" in text and "shuffled_tail" in text and len(text.splitlines()) == 1 + 3 * 4
    for variant in ("native", "same_forced", "shuffled_tail"):
        for n in (1, 2, 4):
            r = got[(variant, n, "interaction")]
            assert r["ci_low"] <= r["mean"] <= r["ci_high"] and r["n_events"] <= 16
    # the shuffled descendant candidate is the native one's full tail (N = 4 here) in another order
    rows = table.to_pylist()
    at4 = {(r["prompt_id"], r["variant"]): r for r in rows if r["n"] == 4}
    shuffled = [(pid, r) for (pid, v), r in at4.items() if v == "shuffled_tail"]
    assert shuffled
    for pid, r in shuffled:
        native = at4[(pid, "native")]
        assert r["it_candidate"][0] == native["it_candidate"][0]
        assert sorted(r["it_candidate"][1:]) == sorted(native["it_candidate"][1:])
        assert r["pt_candidate"] == native["pt_candidate"]
