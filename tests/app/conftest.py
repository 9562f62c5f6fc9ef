"""Fixtures of the service tests: job stores on SQLite and on a real PostgreSQL, settings per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from crosspatch.app.config import Settings
from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.session import Store
from tests.app.pg import PgServer, start_pg


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session (skipped, with the reason, where it cannot run)."""
    try:
        server = start_pg()
    except RuntimeError as e:
        print(f"\nPostgreSQL tests skipped: {e}")
        pytest.skip(f"PostgreSQL unavailable: {e}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty job-store URL: a SQLite file in tmp_path, or a fresh database on the PG server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_database()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A migrated job store on each backend."""
    upgrade(db_url)
    s = Store(db_url)
    yield s
    s.dispose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings isolated in tmp_path (SQLite job store, DuckDB file, parts)."""
    models = tmp_path / "models"
    models.mkdir()
    return Settings(
        data_dir=tmp_path / "data",
        model_roots=[models],
        dictionary_roots=[models],
        lease_seconds=3.0,
        heartbeat_seconds=0.5,
        poll_seconds=0.2,
        _env_file=None,  # type: ignore[call-arg]
    )
