"""dictionaries.k as a float (batch-top-k dictionaries may have a fractional k)

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("dictionaries") as batch:
        batch.alter_column("k", existing_type=sa.Integer(), type_=sa.Float(), existing_nullable=True)


def downgrade() -> None:
    """Revert this revision (fractional k values are rounded)."""
    with op.batch_alter_table("dictionaries") as batch:
        batch.alter_column("k", existing_type=sa.Float(), type_=sa.Integer(), existing_nullable=True)
