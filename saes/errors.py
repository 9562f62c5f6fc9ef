"""User-facing errors of saes/: each is a `CrosspatchError`, so the CLI prints it as one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crosspatch.engine.errors import CrosspatchError


class CacheError(CrosspatchError):
    """An activation cache is missing, incomplete, corrupt, or does not match the request."""


class DictionaryConfigError(CrosspatchError):
    """A dictionary config is invalid (unknown kind/architecture, k > width, bad layer or hook point)."""


class DictionaryLoadError(CrosspatchError):
    """A dictionary could not be loaded (missing dir, corrupt cfg.json, unreachable hub)."""


class GateFailedError(CrosspatchError):
    """A dictionary below the quality gate was used without an explicit override."""


def read_json_object(
    directory: Path, filename: str, what: str, error: type[CrosspatchError]
) -> tuple[Path, dict[str, Any]]:
    """(`directory/filename`, its JSON object); `error` says "no <what> at ..." or "corrupt ..." otherwise."""
    path = directory / filename
    if not directory.is_dir():
        raise error(f"no {what} at {str(directory)!r} (not a directory)")
    if not path.exists():
        raise error(f"no {what} at {str(directory)!r} ({filename} missing)")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"corrupt {path}: {e.msg} (line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise error(f"corrupt {path}: not a JSON object")
    return path, obj
