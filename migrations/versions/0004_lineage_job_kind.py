"""jobs.kind may be 'lineage' (fixed-support lineage sweeps, issue #15)

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = ("divergence", "crosspatch", "train_dictionary", "load_dictionary", "mediation", "pipeline")
_AFTER = (*_BEFORE, "lineage")


def _kinds(kinds: tuple[str, ...]) -> str:
    return "kind IN ({})".format(", ".join(f"'{k}'" for k in kinds))


def _replace(kinds: tuple[str, ...]) -> None:
    """Swap the jobs.kind CHECK (batch mode: SQLite recreates the table with the new constraint)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_jobs_kind"), _kinds(kinds))


def upgrade() -> None:
    """Apply this revision."""
    _replace(_AFTER)


def downgrade() -> None:
    """Revert this revision (lineage jobs must be deleted first)."""
    _replace(_BEFORE)
