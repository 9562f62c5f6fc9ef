"""initial job store

Revision ID: 0001
Revises:
Create Date: 2026-11-25 17:14:00.228343
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from crosspatch.migrations.helpers import (
    KINDS_0001,
    create_indexes,
    create_job_child_table,
    drop_table,
    in_check,
)

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = ("submitted", "queued", "running", "ingesting", "succeeded", "failed", "cancelled")


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "pairs",
        sa.Column("pair_id", sa.String(length=64), nullable=False),
        sa.Column("family", sa.String(length=32), nullable=False),
        sa.Column("pt", sa.String(length=512), nullable=False),
        sa.Column("it", sa.String(length=512), nullable=False),
        sa.Column("n_layers", sa.Integer(), nullable=False),
        sa.Column("default_boundary", sa.Integer(), nullable=False),
        sa.Column("pt_revision", sa.String(length=128), nullable=True),
        sa.Column("it_revision", sa.String(length=128), nullable=True),
        sa.Column("estimated_memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("pair_id", name=op.f("pk_pairs")),
    )
    create_indexes("pairs", {"ix_pairs_family": ["family"]})

    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(in_check("role", ("admin", "researcher")), name=op.f("ck_users_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_keys_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    create_indexes("api_keys", {"ix_api_keys_user_id": ["user_id"]})

    op.create_table(
        "dictionaries",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("pair_id", sa.String(length=64), nullable=True),
        sa.Column("family", sa.String(length=32), nullable=False),
        sa.Column("model_role", sa.String(length=8), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("hook_point", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("architecture", sa.String(length=32), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=True),
        sa.Column("training_tokens", sa.BigInteger(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("gate_status", sa.String(length=16), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("created_by", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            in_check("model_role", ("PT", "IT", "paired")), name=op.f("ck_dictionaries_model_role")
        ),
        sa.ForeignKeyConstraint(["created_by"], ["users.id"], name=op.f("fk_dictionaries_created_by_users")),
        sa.ForeignKeyConstraint(["pair_id"], ["pairs.pair_id"], name=op.f("fk_dictionaries_pair_id_pairs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dictionaries")),
    )
    create_indexes("dictionaries", {"ix_dictionaries_family": ["family"]})

    op.create_table(
        "jobs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.String(length=64), nullable=True),
        sa.Column("estimated_memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("worker_id", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("provenance", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(in_check("kind", KINDS_0001), name=op.f("ck_jobs_kind")),
        sa.CheckConstraint(in_check("status", _STATUSES), name=op.f("ck_jobs_status")),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name=op.f("fk_jobs_owner_id_users")),
        sa.ForeignKeyConstraint(["pair_id"], ["pairs.pair_id"], name=op.f("fk_jobs_pair_id_pairs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    create_indexes(
        "jobs",
        {
            "ix_jobs_lease_expires_at": ["lease_expires_at"],
            "ix_jobs_owner_status": ["owner_id", "status"],
            "ix_jobs_status_priority": ["status", "priority"],
        },
    )

    create_job_child_table(
        "job_logs",
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
    )
    create_job_child_table(
        "job_parts",
        sa.Column("part_index", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("table_name", sa.String(length=32), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        unique=("job_id", "name"),
    )


def downgrade() -> None:
    """Revert this revision."""
    drop_table("job_parts", ["ix_job_parts_job_id"])
    drop_table("job_logs", ["ix_job_logs_job_id"])
    drop_table("jobs", ["ix_jobs_status_priority", "ix_jobs_owner_status", "ix_jobs_lease_expires_at"])
    drop_table("dictionaries", ["ix_dictionaries_family"])
    drop_table("api_keys", ["ix_api_keys_user_id"])
    drop_table("users")
    drop_table("pairs", ["ix_pairs_family"])
