"""cache_entries: dictionaries and activation caches shared across jobs (content-addressed, LRU)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from crosspatch.migrations.helpers import create_indexes, drop_table

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "cache_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("pair_id", sa.String(length=64), nullable=True),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_cache_entries_owner_id_users"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_cache_entries_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cache_entries")),
        sa.UniqueConstraint("key", "owner_id", name="uq_cache_entries_key_owner_id"),
    )
    create_indexes(
        "cache_entries",
        {
            "ix_cache_entries_key": ["key"],
            "ix_cache_entries_pair_id": ["pair_id"],
            "ix_cache_entries_last_used_at": ["last_used_at"],
        },
    )


def downgrade() -> None:
    """Revert this revision."""
    drop_table(
        "cache_entries",
        ["ix_cache_entries_last_used_at", "ix_cache_entries_pair_id", "ix_cache_entries_key"],
    )
