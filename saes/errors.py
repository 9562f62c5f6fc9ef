"""User-facing errors of saes/: each is a `CrosspatchError`, so the CLI prints it as one line."""

from __future__ import annotations

from crosspatch.engine.errors import CrosspatchError


class CacheError(CrosspatchError):
    """An activation cache is missing, incomplete, corrupt, or does not match the request."""


class DictionaryConfigError(CrosspatchError):
    """A dictionary config is invalid (unknown kind/architecture, k > width, bad layer or hook point)."""


class DictionaryLoadError(CrosspatchError):
    """A dictionary could not be loaded (missing dir, corrupt cfg.json, unreachable hub)."""


class GateFailedError(CrosspatchError):
    """A dictionary below the quality gate was used without an explicit override."""
