"""Organism fixtures: constructed organisms are built once per session into a private cache dir."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from crosspatch.engine.organisms import organism_path


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("organism-cache")


@pytest.fixture(scope="session")
def built(organism_cache: Path) -> Callable[[str], Path]:
    """`built(name)` -> the organism's directory, built into the session cache on first use."""
    return lambda name: organism_path(name, cache_dir=organism_cache)
