"""jobs.kind may be 'forced_tokens', 'continuation' or 'lora_control' (method §6 and §4.2, issue #16)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

from crosspatch.migrations.helpers import KINDS_0004, KINDS_0005, replace_job_kinds

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    replace_job_kinds(KINDS_0005)


def downgrade() -> None:
    """Revert this revision (jobs of the new kinds must be deleted first)."""
    replace_job_kinds(KINDS_0004)
