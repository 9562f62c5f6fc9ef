"""jobs.kind may be 'lineage' (fixed-support lineage sweeps, issue #15)

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

from crosspatch.migrations.helpers import KINDS_0001, KINDS_0004, replace_job_kinds

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    replace_job_kinds(KINDS_0004)


def downgrade() -> None:
    """Revert this revision (lineage jobs must be deleted first)."""
    replace_job_kinds(KINDS_0001)
