"""Logging: one format for the service, workers and CLI."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once with crosspatch's format (idempotent)."""
    root = logging.getLogger()
    if not any(getattr(h, "_crosspatch", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler._crosspatch = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
