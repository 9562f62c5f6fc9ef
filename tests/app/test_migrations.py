"""The Alembic migrations and the ORM models describe the same schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import re

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from crosspatch.app.store.migrate import alembic_config, upgrade
from crosspatch.app.store.models import Base
from crosspatch.app.store.session import Store


def _head(db_url: str) -> str:
    return ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()


def test_models_match_migrations(store: Store) -> None:
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models and migrations differ; add a revision: {diff}"


def test_upgrade_is_idempotent(db_url: str) -> None:
    head = _head(db_url)
    assert head == "0006"
    upgrade(db_url)
    s = Store(db_url)
    try:
        with s.engine.connect() as conn:
            tables = sorted(inspect(conn).get_table_names())
        upgrade(db_url)  # a second upgrade changes nothing
        with s.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
            assert sorted(inspect(conn).get_table_names()) == tables
        assert {"jobs", "users", "api_keys", "alembic_version", "job_attempts"} <= set(tables)
    finally:
        s.dispose()


def test_every_job_kind_the_api_accepts_is_allowed_by_the_job_store() -> None:
    """A new job kind needs a migration of the jobs.kind CHECK: the spec union and the store agree."""
    from crosspatch.app.schemas.jobs import job_kinds
    from crosspatch.app.store.models import JOB_KINDS

    assert set(job_kinds()) == set(JOB_KINDS)


def test_head_checks_name_exactly_the_models_values(db_url: str) -> None:
    """The CHECK constraints the revisions leave at head list the models' kinds, statuses, roles and shares."""
    from crosspatch.app.store.models import JOB_KINDS, JOB_STATUSES, MODEL_ROLES, ROLES, SHARES

    upgrade(db_url)
    s = Store(db_url)
    try:
        with s.engine.connect() as conn:
            insp = inspect(conn)
            checks = {
                c["name"]: c["sqltext"]
                for table in ("jobs", "users", "dictionaries")
                for c in insp.get_check_constraints(table)
            }
    finally:
        s.dispose()
    for name, values in [
        ("ck_jobs_kind", JOB_KINDS),
        ("ck_jobs_status", JOB_STATUSES),
        ("ck_jobs_share", SHARES),
        ("ck_users_role", ROLES),
        ("ck_dictionaries_model_role", MODEL_ROLES),
    ]:
        assert sorted(re.findall(r"'([^']*)'", checks[name])) == sorted(values), name


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    """The newest revisions revert cleanly (named constraints, batch mode on SQLite) and reapply."""
    from alembic import command

    upgrade(db_url)
    command.downgrade(alembic_config(db_url), "0002")
    upgrade(db_url)
    s = Store(db_url)
    try:
        with s.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == _head(db_url)
    finally:
        s.dispose()
