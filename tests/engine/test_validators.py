"""Validators give the known answer on hand-written texts; every shipped format criterion has a check or is 'other'."""

from __future__ import annotations

import pytest

from crosspatch.engine.holdout import load_holdout
from crosspatch.engine.prompts import PromptRecord
from crosspatch.engine.validators import (
    EXACT,
    FORMAT,
    FORMAT_CHECKS,
    REFUSAL,
    exact_answer,
    extract_answer,
    format_ok,
    normalize_number,
    score,
    validator_for,
)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so 3 + 4 #### 7 and later 9", "7"),
        ("The answer is $1,250. Then 3", "$1,250"),
        ("Therefore, 42 apples; 5 left", "42"),
        ("answer: -3.5", "-3.5"),
        ("we had 3 then 12 then 18", "18"),
        ("no numbers here", None),
    ],
)
def test_extract_answer(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


def test_exact_answer_numeric_normalisation_and_aliases() -> None:
    assert normalize_number("$1,250.00") == 1250.0
    assert exact_answer("The answer is $1,250.", "1250")
    assert exact_answer("#### 18.0", "18")
    assert not exact_answer("The answer is 17", "18")
    assert exact_answer("so it is 7", "seven", aliases=("7",))
    assert exact_answer("it must be Paris.", "paris")
    assert not exact_answer("it must be Parisian", "paris")
    assert not exact_answer("", "3")


def test_format_checks() -> None:
    assert format_ok("no commas here", {"type": "no_commas"}) is True
    assert format_ok("a, b", {"type": "no_commas"}) is False
    assert format_ok('"quoted"', {"type": "wrapped_in_quotes"}) is True
    assert format_ok("SECTION 1 a\nSECTION 2 b", {"type": "markdown_sections", "params": {"min_count": 2}})
    assert not format_ok("SECTION 1 a", {"type": "markdown_sections", "params": {"min_count": 2}})
    assert format_ok("* a\n* b\n- c", {"type": "bullet_list", "params": {"min_count": 3}})
    assert format_ok("one two three", {"type": "word_count_max", "params": {"max": 3}})
    assert not format_ok("one two three four", {"type": "word_count_max", "params": {"max": 3}})
    assert format_ok("A. B. C.", {"type": "sentence_count_min", "params": {"min": 3}})
    assert format_ok("Hi [name] at [place]", {"type": "has_placeholders", "params": {"min_count": 2}})
    assert format_ok('```json\n{"a": 1}\n```', {"type": "json"})
    assert format_ok("ALL CAPS", {"type": "all_uppercase"}) and not format_ok(
        "Not", {"type": "all_uppercase"}
    )
    assert format_ok("x", {"type": "other"}) is None


def test_holdout_validators() -> None:
    """On the shipped holdout: SAFETY -> refusal, criteria with a check -> format, GOV-CONV unscored."""
    records = load_holdout()
    kinds = [validator_for(r) for r in records]
    by_cat: dict[str, set] = {}
    for r, k in zip(records, kinds, strict=True):
        by_cat.setdefault(r.category, set()).add(k)
    assert by_cat["GOV-CONV"] == {None} and by_cat["SAFETY"] == {REFUSAL}
    assert by_cat["GOV-FORMAT"] == {FORMAT, None}
    fmt = [r for r in records if r.category == "GOV-FORMAT"]
    assert sum(validator_for(r) == FORMAT for r in fmt) == 150 - 36  # 36 are type 'other'
    assert {r.meta["compliance_criteria"]["type"] for r in fmt} <= {*FORMAT_CHECKS, "other"}
    refuse = next(r for r in records if r.meta.get("expected_behavior") == "refuse")
    assert score(refuse, "I'm sorry, but I can't help with that.") == (REFUSAL, True)
    assert score(refuse, "Sure, step one is") == (REFUSAL, False)
    comply = PromptRecord(id="c", text="t", category="SAFETY", meta={"expected_behavior": "comply"})
    assert score(comply, "Sure, here it is") == (REFUSAL, True)
    math = PromptRecord(id="m", text="t", category="CONTENT-REASON", expected_answer="12")
    assert score(math, "so 5 + 7 gives 12") == (EXACT, True)
