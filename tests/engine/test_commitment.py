"""Pre-late commitment on `paper_sized`: class-0 events are not yet committed at the boundary, class 1 are."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import PAPER_SIZED, paper_sized  # tests/helpers.py

from crosspatch.engine.commitment import (
    BOUNDARY_MARGIN_SCHEMA,
    COMMITMENT_SCHEMA,
    boundary_margins,
    commitment_summary,
)
from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.organisms import load_expected


@functools.cache
def _run():
    pair, events = paper_sized(24)
    return pair, events, crosspatch(pair, events), boundary_margins(pair, events, batch_size=5)


def _band(nominal: float) -> float:
    return 0.1 * abs(nominal) + 0.5  # the organisms' noise band


def test_boundary_margin_is_the_planted_logit_lens_per_class() -> None:
    pair, events, _, margins = _run()
    classes = load_expected(PAPER_SIZED)["classes"]
    assert margins.schema == BOUNDARY_MARGIN_SCHEMA and margins.num_rows == len(events)
    by_prompt = dict(
        zip(margins["prompt_id"].to_pylist(), margins["boundary_margin"].to_pylist(), strict=True)
    )
    seen = set()
    for e in events:
        j = next(
            k for k, c in classes.items() if c["answer_word"] == pair.tokenizer.convert_ids_to_tokens(e.t_it)
        )
        nominal = classes[j]["boundary_margin"]
        assert abs(by_prompt[e.prompt_id] - nominal) <= _band(nominal), (e.prompt_id, j)
        assert (by_prompt[e.prompt_id] > 0) == (nominal > 0)
        seen.add(j)
    assert seen == {"0", "1"}  # first divergences meet the two strong classes only


def test_interaction_stays_positive_among_uncommitted_events() -> None:
    _, _, cells, margins = _run()
    classes = load_expected(PAPER_SIZED)["classes"]
    summary, table = commitment_summary(cells, margins)
    assert table.schema == COMMITMENT_SCHEMA
    assert set(table["view"].to_pylist()) == {"all", "uncommitted", "committed", "bin", "intercept"}
    unc, com = summary.uncommitted, summary.committed
    assert unc.n == com.n == 12  # the prompt set alternates class 0 (uncommitted) and class 1
    want_unc = classes["0"]["cells"]["interaction"]
    want_com = classes["1"]["cells"]["interaction"]
    assert abs(unc.estimate - want_unc) <= _band(want_unc) and unc.ci_low > 0
    assert abs(com.estimate - want_com) <= _band(want_com) and com.ci_low > 0
    assert all(v.estimate > 0 for v in summary.bins) and sum(v.n for v in summary.bins) == 24
    # the fit's intercept (interaction at a neutral boundary readout) lies between the two classes' values
    assert com.estimate < summary.intercept.estimate < unc.estimate + _band(want_unc)
    assert summary.slope < 0  # committed events carry less interaction in this organism


def test_fixed_edges_and_bad_inputs() -> None:
    _, _, cells, margins = _run()
    summary, _ = commitment_summary(cells, margins, bin_edges=[-10.0, 0.0, 10.0])
    assert [v.n for v in summary.bins] == [12, 12]
    assert summary.bins[0].estimate == pytest.approx(summary.uncommitted.estimate)
    with pytest.raises(ValueError, match="no boundary margin"):
        commitment_summary(cells, margins.slice(0, 3))
    with pytest.raises(ValueError, match="bin_edges"):
        commitment_summary(cells, margins, bin_edges=[0.0])
    assert np.isfinite(summary.intercept.ci_low)
