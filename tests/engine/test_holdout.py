"""The shipped holdout-600 set reads in the method's format, with its licence beside it."""

from collections import Counter

from crosspatch.engine.holdout import HOLDOUT_LICENSE, load_holdout


def test_holdout_600_ships_with_counts_and_licence() -> None:
    records = load_holdout()
    assert len(records) == 600
    assert Counter(r.category for r in records) == {"GOV-CONV": 300, "GOV-FORMAT": 150, "SAFETY": 150}
    assert "MIT License" in HOLDOUT_LICENSE.read_text()
    fmt = [r for r in records if r.category == "GOV-FORMAT"]
    assert sum("compliance_criteria" in r.meta for r in fmt) == 150
