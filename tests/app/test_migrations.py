"""The Alembic migrations and the ORM models describe the same schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from crosspatch.app.store.migrate import alembic_config, upgrade
from crosspatch.app.store.models import Base
from crosspatch.app.store.session import Store


def test_models_match_migrations(store: Store) -> None:
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models and migrations differ; add a revision: {diff}"


def test_upgrade_is_idempotent(db_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()
    upgrade(db_url)
    s = Store(db_url)
    try:
        with s.engine.connect() as conn:
            tables = sorted(inspect(conn).get_table_names())
        upgrade(db_url)  # a second upgrade changes nothing
        with s.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
            assert sorted(inspect(conn).get_table_names()) == tables
        assert {"jobs", "users", "api_keys", "alembic_version"} <= set(tables)
    finally:
        s.dispose()
