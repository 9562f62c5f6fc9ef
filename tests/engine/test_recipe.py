"""Secondary scales, recipe contrast and the fixed-support lineage sweep on the `lineage` organism.

Its three instruction stages (sft, dpo, final) add a u-gated late push scaled 0.3 / 0.7 / 1.0; the
`portable` descendant has the base's upstream and an always-on late push (interaction exactly 0).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
from helpers import organism_events  # tests/helpers.py

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.organisms import load_expected
from crosspatch.engine.pairs import load_model
from crosspatch.engine.recipe import (
    LINEAGE_CELLS_SCHEMA,
    LINEAGE_SCHEMA,
    interaction_share,
    lineage_sweep,
    portable_share,
    ratio_of_means,
    recipe_contrast,
    summarize_lineage,
)

NAME = "llama_lineage"
ORDER = ("sft", "dpo", "final", "portable")


@functools.cache
def _run():
    root, pair, events = organism_events(NAME, limit=24)  # base -> final: the support and its labels
    stages = {name: load_model(root / "stages" / name)[0] for name in ORDER}
    cells = lineage_sweep(pair.pt, stages, pair.tokenizer, events, base_id="lineage-base", batch_size=10)
    return pair, events, cells


def _stage(cells, name):
    return cells.filter(np.asarray(cells["stage"].to_pylist()) == name)


def test_stages_come_out_in_planted_order_with_cis() -> None:
    _, events, cells = _run()
    expected = load_expected(NAME)["stages"]
    assert cells.schema == LINEAGE_CELLS_SCHEMA and cells.num_rows == len(ORDER) * len(events)
    table = summarize_lineage(cells, reference="final")
    assert table.schema == LINEAGE_SCHEMA and table["stage"].to_pylist() == list(ORDER)
    rows = {r["stage"]: r for r in table.to_pylist()}
    for name in ORDER:
        band = expected[name]["cells"]["interaction"]
        assert band["lo"] <= rows[name]["interaction"] <= band["hi"], (name, rows[name], band)
    sft, dpo, final = rows["sft"], rows["dpo"], rows["final"]
    assert sft["ci_low"] > 0 and sft["ci_high"] < dpo["ci_low"] and dpo["ci_high"] < final["ci_low"]
    assert sft["share_of_reference"] < dpo["share_of_reference"] < final["share_of_reference"] == 1.0
    assert final["share_ci_low"] == final["share_ci_high"] == 1.0
    assert final["native_top1_rate"] == 1.0  # the support is final's own first divergences
    assert final["p_value"] < 1e-3
    # the same cells as the plain 2x2 on the base/final pair
    pair, events, _ = _run()
    plain = crosspatch(pair, events)
    assert np.allclose(
        _stage(cells, "final")["interaction"].to_numpy(), plain["interaction"].to_numpy(), atol=1e-6
    )


def test_portable_descendant_is_large_from_either_upstream() -> None:
    _, _, cells = _run()
    port = _stage(cells, "portable")
    share = portable_share(port)
    assert share.estimate == pytest.approx(1.0, abs=1e-9) and share.ci_low <= 1.0 <= share.ci_high
    assert share.denominator > 2.0  # a large late effect, from either upstream
    row = summarize_lineage(cells).to_pylist()[ORDER.index("portable")]
    assert row["ci_low"] <= 0.0 <= row["ci_high"] and abs(row["interaction"]) < 1e-6
    contrast = recipe_contrast(_stage(cells, "final"), port)  # instruction-following minus portable
    assert contrast.ci_low > 1.0 and contrast.p_value < 1e-3 and contrast.n == port.num_rows


def test_secondary_scales_match_the_construction() -> None:
    _, _, cells = _run()
    final = _stage(cells, "final")
    nominal = load_expected(NAME)["stages"]["final"]["cells"]
    want = nominal["pt_late_effect"]["nominal"] / nominal["it_late_effect"]["nominal"]
    share = portable_share(final)
    assert share.estimate == pytest.approx(want, abs=0.05) and share.ci_low < share.estimate < share.ci_high
    diag = nominal["y_itup_itlate"]["nominal"] - nominal["y_ptup_ptlate"]["nominal"]
    assert interaction_share(final).estimate == pytest.approx(
        nominal["interaction"]["nominal"] / diag, abs=0.05
    )


def test_ratio_of_means_hand_values() -> None:
    r = ratio_of_means([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], n_resamples=200)
    assert r.estimate == pytest.approx(1.0) and r.numerator == pytest.approx(2.0) and r.n == 3
    assert r.ci_low <= 1.0 <= r.ci_high
    zero = ratio_of_means([1.0, -1.0], [0.0, 0.0], n_resamples=50)
    assert np.isnan(zero.estimate) and np.isnan(zero.ci_low)
    with pytest.raises(ValueError, match="paired"):
        ratio_of_means([1.0], [1.0, 2.0])


def test_preflight_rejects_labels_outside_the_shared_vocabulary() -> None:
    pair, events, cells = _run()
    bad = [replace(events[0], t_it=10_000), *events[1:3]]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lineage_sweep(pair.pt, {"final": pair.it}, pair.tokenizer, bad)
    with pytest.raises(ValueError, match="reference"):
        summarize_lineage(cells, reference="rlvr")
    with pytest.raises(ValueError, match="several pair_id"):
        portable_share(cells)
