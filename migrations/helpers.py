"""What the revisions share: the jobs.kind history, CHECK text, and the tables that hang off `jobs`."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# jobs.kind as each revision left it (frozen: a new kind is a new revision, never an edit here)
KINDS_0001 = ("divergence", "crosspatch", "train_dictionary", "load_dictionary", "mediation", "pipeline")
KINDS_0004 = (*KINDS_0001, "lineage")
KINDS_0005 = (*KINDS_0004, "forced_tokens", "continuation", "lora_control")


def in_check(column: str, values: Sequence[str]) -> str:
    """The SQL of a `column IN ('a', 'b')` CHECK constraint."""
    return "{} IN ({})".format(column, ", ".join(f"'{v}'" for v in values))


def replace_job_kinds(kinds: Sequence[str]) -> None:
    """Swap the jobs.kind CHECK (batch mode: SQLite recreates the table with the new constraint)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_jobs_kind"), in_check("kind", kinds))


def create_indexes(table: str, indexes: dict[str, list[str]]) -> None:
    """Create non-unique indexes {name: columns} on `table`."""
    with op.batch_alter_table(table, schema=None) as batch_op:
        for name, columns in indexes.items():
            batch_op.create_index(batch_op.f(name), columns, unique=False)


def drop_table(table: str, indexes: Sequence[str] = ()) -> None:
    """Drop `table` after its named indexes."""
    if indexes:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name in indexes:
                batch_op.drop_index(batch_op.f(name))
    op.drop_table(table)


def create_job_child_table(table: str, *columns: sa.Column, unique: Sequence[str] = ()) -> None:
    """A table of rows owned by one job: integer id, job_id deleted with its job, indexed by job_id."""
    constraints: list[sa.Constraint] = [
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f(f"fk_{table}_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
    ]
    if unique:
        constraints.append(sa.UniqueConstraint(*unique, name=f"uq_{table}_{'_'.join(unique)}"))
    op.create_table(
        table,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        *columns,
        *constraints,
    )
    create_indexes(table, {f"ix_{table}_job_id": ["job_id"]})
