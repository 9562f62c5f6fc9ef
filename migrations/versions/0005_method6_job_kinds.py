"""jobs.kind may be 'forced_tokens', 'continuation' or 'lora_control' (method §6 and §4.2, issue #16)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = (
    "divergence",
    "crosspatch",
    "train_dictionary",
    "load_dictionary",
    "mediation",
    "pipeline",
    "lineage",
)
_AFTER = (*_BEFORE, "forced_tokens", "continuation", "lora_control")


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
    """Revert this revision (jobs of the new kinds must be deleted first)."""
    _replace(_BEFORE)
