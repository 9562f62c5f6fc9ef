"""The project's prompt set of record: the method's 600-prompt holdout (method §3.2), shipped with its MIT licence.

300 GOV-CONV, 150 GOV-FORMAT (IFEval, with `compliance_criteria`), 150 SAFETY (`expected_behavior`
comply/refuse); the file and `LICENSE-holdout` live in `engine/data/` and travel in the wheel.
"""

from __future__ import annotations

from pathlib import Path

from crosspatch.engine.prompts import PromptRecord, load_prompts

DATA_DIR = Path(__file__).parent / "data"
HOLDOUT_600 = DATA_DIR / "holdout_600.jsonl"
HOLDOUT_LICENSE = DATA_DIR / "LICENSE-holdout"


def holdout_path() -> Path:
    """Path of the shipped holdout-600 JSONL (raises if the package was installed without its data)."""
    if not HOLDOUT_600.is_file():
        raise FileNotFoundError(f"the shipped holdout set is missing at {HOLDOUT_600}; reinstall crosspatch")
    return HOLDOUT_600


def load_holdout(limit: int | None = None) -> list[PromptRecord]:
    """The holdout-600 prompts as `PromptRecord`s (format B text, categories, answers, criteria in `meta`)."""
    return load_prompts(holdout_path(), limit=limit)
