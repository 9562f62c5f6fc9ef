"""The Alembic migrations and the ORM models describe the same schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.models import Base
from crosspatch.app.store.session import Store


def test_models_match_migrations(store: Store) -> None:
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models and migrations differ; add a revision: {diff}"


def test_upgrade_is_idempotent(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)
    s = Store(db_url)
    try:
        with s.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() is not None
    finally:
        s.dispose()


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    """The newest revision reverts cleanly (named constraints, batch mode on SQLite) and reapplies."""
    from alembic import command

    from crosspatch.app.store.migrate import alembic_config

    upgrade(db_url)
    command.downgrade(alembic_config(db_url), "0002")
    upgrade(db_url)
    s = Store(db_url)
    try:
        with s.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == "0004"  # 0004 and 0003 reverted
    finally:
        s.dispose()
