"""Forced-token scoring on `forced_answer`: IT's token leads to the right answer, PT's does not.

By construction (engine/organisms/forced.py) the forced IT token succeeds on 12/16 CONTENT-REASON prompts
and the PT token on 0/16 (contrast 0.75); on CONTENT-FACT both branches give the same answer (contrast 0);
GOV-CONV is not scored.
"""

from __future__ import annotations

import functools
import json

import pytest

from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.forced import (
    FORCED_SCHEMA,
    FORCED_SUMMARY_SCHEMA,
    alternatives,
    forced_table,
    summarize_forced,
    token_class,
)
from crosspatch.engine.organisms.forced import forced_organism_path
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.prompts import load_prompts
from crosspatch.engine.report import format_forced


@functools.cache
def _run():
    root = forced_organism_path()
    pair = load_pair(root / "pt", root / "it", pair_id="forced_answer")
    prompts = load_prompts(root / "prompts.jsonl")
    events = find_divergences(pair, prompts)
    table = forced_table(pair, events, prompts, batch_size=5)
    return root, pair, events, table


def _summary_row(summary, level: str, category: str, statistic: str, view: str = "suffix") -> dict:
    rows = [
        r
        for r in summary.to_pylist()
        if (r["level"], r["category"], r["statistic"], r["view"]) == (level, category, statistic, view)
    ]
    assert len(rows) == 1
    return rows[0]


def test_contrast_positive_on_reasoning_and_zero_where_the_token_does_not_matter() -> None:
    root, _, events, table = _run()
    expected = json.loads((root / "expected.json").read_text())
    assert table.schema == FORCED_SCHEMA
    assert table.num_rows == 4 * len(events) == 4 * 28
    summary = summarize_forced(table)
    assert summary.schema == FORCED_SUMMARY_SCHEMA
    reason = _summary_row(summary, "pair", "CONTENT-REASON", "contrast")
    assert reason["mean"] == pytest.approx(expected["CONTENT-REASON"]["contrast"]) == 0.75
    assert reason["ci_low"] > 0 and reason["n_events"] == 16
    fact = _summary_row(summary, "pair", "CONTENT-FACT", "contrast")
    assert fact["mean"] == 0.0 and fact["ci_low"] <= 0 <= fact["ci_high"] and fact["n_events"] == 8
    assert _summary_row(summary, "pair", "CONTENT-FACT", "success_it")["mean"] == 0.75
    assert _summary_row(summary, "pair", "CONTENT-REASON", "success_pt")["mean"] == 0.0
    balanced = _summary_row(summary, "balanced", "CONTENT-REASON", "contrast")
    assert balanced["mean"] == 0.75 and balanced["n_families"] == 1 and balanced["ci_low"] > 0
    assert not [r for r in summary.to_pylist() if r["category"] == "GOV-CONV"]  # unscored
    text = format_forced(summary)
    assert "CONTENT-REASON   forced_answer            +0.750 [" in text and "family-balanced (1)" in text


def test_continuations_are_kept_and_read_as_constructed() -> None:
    _, pair, _, table = _run()
    rows = {(r["prompt_id"], r["branch"]): r for r in table.to_pylist()}
    it0, pt0 = rows[("reason_00", "it")], rows[("reason_00", "pt")]
    # cat -> IT "red" -> "0 ." EOS; PT's "sees" -> IT continues "5 ." EOS
    assert (it0["forced_text"], it0["continuation_text"], it0["stop"]) == ("red", "0 .", "eos")
    assert (pt0["forced_text"], pt0["continuation_text"]) == ("sees", "5 .")
    assert it0["success"] is True and pt0["success"] is False and it0["validator"] == "exact_answer"
    assert (it0["it_rank"], pt0["it_rank"]) == (1, 2)
    conv = rows[("conv_00", "it")]
    assert conv["validator"] is None and conv["success"] is None and conv["continuation_text"] == ""
    for (pid, branch), r in rows.items():
        if branch in ("rank_matched", "class_matched"):
            assert r["forced_token"] not in (
                rows[(pid, "it")]["forced_token"],
                rows[(pid, "pt")]["forced_token"],
            )
            assert r["forced_token"] != pair.it_tokenizer.eos_token_id
    # class-matched keeps t_IT's class: a colour (lower-case word) for reason prompts
    assert token_class(rows[("reason_00", "class_matched")]["forced_text"]) == "lower"
    # ranks at a noun: t_IT 1, t_PT 2, then ties at logit 0 in id order, EOS (id 2) first: never forced
    assert rows[("reason_00", "rank_matched")]["it_rank"] == 4


def test_alternatives_and_bad_input() -> None:
    root, pair, events, _ = _run()
    alts = alternatives(pair, events[:2])
    assert alts[0]["it"] == (events[0].t_it, 1) and alts[0]["pt"] == (events[0].t_pt, 2)
    with pytest.raises(ValueError, match="branches must include"):
        forced_table(pair, events, load_prompts(root / "prompts.jsonl"), branches=("it",))
    with pytest.raises(ValueError, match="no prompt record"):
        forced_table(pair, events, [])
    assert token_class(" Hello") == "_upper" and token_class("42") == "number" and token_class(".") == "punct"
