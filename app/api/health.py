"""Health and version (no key needed)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func, select

from crosspatch.app.deps import ReadSessionDep, ResultsDep
from crosspatch.app.schemas.common import Health, Version
from crosspatch.app.schemas.jobs import job_kinds
from crosspatch.app.store.models import Job

router = APIRouter(tags=["health"])
API_VERSION = "1"


@router.get("/health", response_model=Health)
def health(session: ReadSessionDep, results: ResultsDep) -> Health:
    """Liveness plus queue depth."""
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    with results.cursor() as cur:
        cur.execute("SELECT 1").fetchone()
    return Health(
        status="ok",
        database="ok",
        results="ok",
        queued=counts.get("queued", 0),
        running=counts.get("running", 0),
    )


@router.get("/version", response_model=Version)
def version() -> Version:
    """Versions of the service and the job kinds it can run."""
    from importlib.metadata import version as pkg_version

    return Version(crosspatch=pkg_version("crosspatch"), api=API_VERSION, job_kinds=job_kinds())
