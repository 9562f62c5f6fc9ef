"""job attempts history, worker losses counted apart from attempts, per-job results share

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from crosspatch.migrations.helpers import create_job_child_table, drop_table, in_check

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    create_job_child_table(
        "job_attempts",
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=128), nullable=False),
        sa.Column("claimed_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("losses", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("share", sa.String(length=8), server_default="lab", nullable=False))
        batch_op.create_check_constraint(op.f("ck_jobs_share"), in_check("share", ("lab", "owner")))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_jobs_share"), type_="check")
        batch_op.drop_column("share")
        batch_op.drop_column("losses")
    drop_table("job_attempts", ["ix_job_attempts_job_id"])
