"""Prompt sets: JSONL records in the method's format, validated with line numbers.

One JSON object per line with `id` and `prompt` (or `formats` {"A", "B"}), optionally `category`,
`expected_answer`, `answer_aliases`, and anything else (kept in `meta`). The raw text is `formats.B`,
else `formats.A`, else `prompt`, as the method's code does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosspatch.engine.errors import PromptFileError


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a set; `text` is the raw prompt both models see."""

    id: str
    text: str
    category: str = "uncategorized"
    expected_answer: str | None = None
    answer_aliases: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def record_from_dict(obj: dict[str, Any], where: str = "record") -> PromptRecord:
    """Validate one JSON object and build a `PromptRecord`; errors name `where` (e.g. 'line 7')."""
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj or obj["id"] in (None, ""):
        raise PromptFileError(f"{where}: missing 'id'")
    formats = obj.get("formats") or {}
    if not isinstance(formats, dict):
        raise PromptFileError(f"{where}: 'formats' must be an object with keys 'A'/'B'")
    text = formats.get("B") or formats.get("A") or obj.get("prompt")
    if not isinstance(text, str) or not text:
        raise PromptFileError(f"{where}: needs a non-empty 'prompt' (or 'formats' with 'A' or 'B')")
    aliases = obj.get("answer_aliases") or []
    if not isinstance(aliases, list):
        raise PromptFileError(f"{where}: 'answer_aliases' must be a list")
    known = {"id", "prompt", "formats", "category", "expected_answer", "answer_aliases"}
    expected = obj.get("expected_answer")
    return PromptRecord(
        id=str(obj["id"]),
        text=text,
        category=str(obj.get("category") or "uncategorized"),
        expected_answer=None if expected is None else str(expected),
        answer_aliases=tuple(str(a) for a in aliases),
        meta={k: v for k, v in obj.items() if k not in known},
    )


def load_prompts(path: str | Path, limit: int | None = None) -> list[PromptRecord]:
    """Read a JSONL prompt file; a malformed line, missing field or duplicate id names its line."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist")
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path.name} line {lineno}: not valid JSON ({e.msg})") from None
            rec = record_from_dict(obj, where=f"{path.name} line {lineno}")
            if rec.id in seen:
                raise PromptFileError(
                    f"{path.name} line {lineno}: duplicate id {rec.id!r} (first on line {seen[rec.id]})"
                )
            seen[rec.id] = lineno
            records.append(rec)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise PromptFileError(f"prompt file {str(path)!r} has no prompts")
    return records
