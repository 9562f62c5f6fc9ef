"""The on-disk layout of a job under the data directory, shared by workers, services and the CLI.

data_dir/jobs/<job id>/            Parquet checkpoint parts (`events.00003.parquet`, ...)
data_dir/jobs/<job id>/figures/    the job's PNG figures
"""

from __future__ import annotations

import uuid
from pathlib import Path


def parts_dir(data_dir: Path, job_id: uuid.UUID | str) -> Path:
    """Where a job's Parquet parts live."""
    return Path(data_dir) / "jobs" / str(job_id)


def figures_dir(data_dir: Path, job_id: uuid.UUID | str) -> Path:
    """Where a job's figures live: beside its parts."""
    return parts_dir(data_dir, job_id) / "figures"
