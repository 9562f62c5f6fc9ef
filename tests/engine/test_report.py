"""Plain-text mediation lines: null shares and unavailable controls say what they are."""

from __future__ import annotations

import pyarrow as pa

from crosspatch.engine.report import format_checks, format_effects, format_mediation
from crosspatch.engine.results import FEATURE_EFFECTS_SCHEMA


def _r(
    intervention: str, statistic: str, effect, lo=None, hi=None, n: int = 30, k: int = 4, latent=None
) -> dict:
    return dict(
        family="llama",
        pair_id="p",
        dictionary_id="d",
        layer=None if latent is None else 4,
        intervention=intervention,
        k=k,
        latent=latent,
        statistic=statistic,
        effect=effect,
        ci_low=lo,
        ci_high=hi,
        n=n,
    )


def test_shares_print_only_where_the_interaction_ci_excludes_zero_and_unavailable_controls_say_so():
    rows = [
        _r("baseline", "interaction", 2.0, 1.5, 2.5, k=0),
        _r("ablate_topk", "interaction_drop", 1.0, 0.8, 1.2),
        _r("ablate_topk", "share", 0.5, 0.4, 0.6),
        _r("ablate_matched_random", "interaction_drop", None, n=0),
        _r("ablate_matched_random", "share", None, n=0),
        _r("attribution", "attribution_score", 0.9, n=10, k=1, latent=7),
        _r("ablate_single", "interaction_drop", 0.7, 0.5, 0.9, k=1, latent=7),
    ]
    text = format_effects(pa.Table.from_pylist(rows, schema=FEATURE_EFFECTS_SCHEMA))
    assert "ablate_topk                     4  share              +0.500 [+0.400, +0.600]" in text
    assert "ablate_matched_random           4  share              unavailable" in text
    assert "d:7      layer 4  score +0.9  held-out drop +0.700 [+0.500, +0.900] (n=30)" in text
    med = format_mediation(pa.Table.from_pylist(rows, schema=FEATURE_EFFECTS_SCHEMA))
    assert "+50.0% [+40.0, +60.0]" in med and "unavailable" in med
    # an interaction whose CI covers 0: the engine writes a null share, and no share is printed
    rows[0] = _r("baseline", "interaction", 0.1, -0.2, 0.4, k=0)
    rows[2] = _r("ablate_topk", "share", None)
    text = format_effects(pa.Table.from_pylist(rows, schema=FEATURE_EFFECTS_SCHEMA))
    assert "share              n/a (CI of the denominator covers 0)" in text and "+0.500 [" not in text
    med = format_mediation(pa.Table.from_pylist(rows, schema=FEATURE_EFFECTS_SCHEMA))
    assert "n/a: no interaction to mediate (CI covers 0)" in med and "%" not in med


def test_checks_are_printed_by_name_with_the_unavailable_reason():
    checks = [
        dict(name="topk_causal_drop", value=1.0, threshold=0.0, passed=True, k=4, detail="mean top-4 drop"),
        dict(
            name="matched_random_drop", value=None, threshold=0.05, passed=False, k=4, detail="unavailable: x"
        ),
    ]
    controls = {"matched_random": {"by_k": {4: {"available": False, "reason": "pool too small at k=4"}}}}
    text = format_checks(checks, controls)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert "topk_causal_drop +1 threshold 0 passed: mean top-4 drop" in lines
    assert "matched_random_drop - threshold 0.05 FAILED: unavailable: x" in lines
    assert "matched-random control unavailable at k=4: pool too small at k=4" in text
