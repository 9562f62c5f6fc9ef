"""Queue operations, each one atomic statement on the job store (safe across processes and hosts).

Claim: PostgreSQL picks with `FOR UPDATE SKIP LOCKED`; SQLite runs `UPDATE ... WHERE id = (SELECT ...)
AND status = 'queued'` under BEGIN IMMEDIATE. Every worker-side update is conditional on the worker
still holding the job (`worker_id` and `status = 'running'`); when it is not (cancelled, lease lost),
the update touches no row and the worker stops.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, and_, insert, select, update
from sqlalchemy.orm import Session

from crosspatch.app.queue.policy import candidate
from crosspatch.app.store.models import ACTIVE_STATUSES, Job, JobAttempt, JobLog, utcnow
from crosspatch.app.store.session import Store

jobs = Job.__table__
attempts_ = JobAttempt.__table__


def claim(
    store: Store,
    worker_id: str,
    *,
    lease_seconds: float,
    memory_bytes: int | None = None,
    loaded_pair: str | None = None,
) -> uuid.UUID | None:
    """Give the next job by policy to `worker_id` (status running, lease set); None if none fits."""
    pick, _ = candidate(memory_bytes, loaded_pair)
    if store.dialect == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    now = utcnow()
    stmt = (
        update(jobs)
        .where(jobs.c.id == pick.scalar_subquery(), jobs.c.status == "queued")
        .values(
            status="running",
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            claimed_at=now,
            attempts=jobs.c.attempts + 1,
            started_at=now,
            error=None,
        )
        .returning(jobs.c.id, jobs.c.attempts)
    )
    with store.session() as s:
        row = s.execute(stmt).first()
        if row is None:
            return None
        job_id, attempt = row
        s.execute(insert(JobLog).values(job_id=job_id, message=f"claimed by worker {worker_id}"))
        s.execute(
            insert(attempts_).values(job_id=job_id, attempt=attempt, worker_id=worker_id, claimed_at=now)
        )
    return job_id


def end_attempt(
    session: Session, job_id: uuid.UUID, outcome: str, detail: str | None = None, worker_id: str | None = None
) -> None:
    """Close the job's open attempt (its history row) with how it ended, in the caller's transaction."""
    where = [attempts_.c.job_id == job_id, attempts_.c.ended_at.is_(None)]
    if worker_id is not None:
        where.append(attempts_.c.worker_id == worker_id)
    values = dict(ended_at=utcnow(), outcome=outcome, detail=detail[:4000] if detail else None)
    session.execute(update(attempts_).where(*where).values(**values))


def attempts(store: Store, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """The job's attempts, oldest first: attempt, worker_id, claimed_at, ended_at, outcome, detail."""
    with store.session(write=False) as s:
        rows = s.execute(select(attempts_).where(attempts_.c.job_id == job_id).order_by(attempts_.c.id))
        return [dict(r._mapping) for r in rows]


def _held(job_id: uuid.UUID, worker_id: str) -> Any:
    return and_(jobs.c.id == job_id, jobs.c.worker_id == worker_id, jobs.c.status == "running")


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return result.rowcount


def heartbeat(
    store: Store,
    job_id: uuid.UUID,
    worker_id: str,
    *,
    lease_seconds: float,
    progress: dict[str, Any] | None = None,
) -> bool:
    """Renew the lease (and store progress); False when the worker no longer holds the job."""
    now = utcnow()
    values: dict[str, Any] = dict(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
    if progress is not None:
        values["progress"] = progress
    with store.session() as s:
        return _rowcount(s.execute(update(jobs).where(_held(job_id, worker_id)).values(**values))) == 1


def finish_running(
    store: Store,
    job_id: uuid.UUID,
    worker_id: str,
    *,
    status: str,
    error: str | None = None,
    provenance: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
) -> bool:
    """Move a held job on: to `ingesting` (done), `failed`, or back to `queued` (released)."""
    assert status in ("ingesting", "failed", "queued")
    values: dict[str, Any] = dict(status=status, lease_expires_at=None)
    if status == "failed":
        values.update(error=error, finished_at=utcnow(), worker_id=None)
    if status == "queued":
        values.update(worker_id=None, attempts=jobs.c.attempts - 1)  # a graceful release is no attempt
    if provenance is not None:
        values["provenance"] = provenance
    if progress is not None:
        values["progress"] = progress
    outcome = {"ingesting": "finished", "failed": "failed", "queued": "released"}[status]
    with store.session() as s:
        held = _rowcount(s.execute(update(jobs).where(_held(job_id, worker_id)).values(**values))) == 1
        if held:
            end_attempt(s, job_id, outcome, error, worker_id=worker_id)
        return held


def requeue_expired(store: Store, *, max_losses: int, now: datetime | None = None) -> list[uuid.UUID]:
    """Re-queue running jobs whose lease expired (their worker died); fail those lost `max_losses` times.

    Losses are counted apart from attempts: a worker killed under a job is seldom the job's fault, so
    the cap is higher than for job errors (which fail at once). `now` defaults to the clock; tests pass
    a time to check expiry without waiting.
    """
    now = now or utcnow()
    expired = and_(jobs.c.status == "running", jobs.c.lease_expires_at < now)
    with store.session() as s:
        failed = list(
            s.execute(
                update(jobs)
                .where(expired, jobs.c.losses + 1 >= max_losses)
                .values(
                    status="failed",
                    worker_id=None,
                    lease_expires_at=None,
                    finished_at=now,
                    losses=jobs.c.losses + 1,
                    error=f"worker lost {max_losses} times (lease expired); giving up",
                )
                .returning(jobs.c.id)
            ).scalars()
        )
        requeued = list(
            s.execute(
                update(jobs)
                .where(expired)
                .values(status="queued", worker_id=None, lease_expires_at=None, losses=jobs.c.losses + 1)
                .returning(jobs.c.id)
            ).scalars()
        )
        for job_id in failed:
            end_attempt(s, job_id, "worker_lost", "lease expired; the job failed")
            s.execute(insert(JobLog).values(job_id=job_id, level="ERROR", message="lease expired; failed"))
        for job_id in requeued:
            end_attempt(s, job_id, "worker_lost", "lease expired; re-queued")
            s.execute(
                insert(JobLog).values(job_id=job_id, level="WARNING", message="lease expired; re-queued")
            )
    return requeued


def cancel(store: Store, job_id: uuid.UUID) -> bool:
    """Cancel a job that is not finished yet; a running worker notices at its next check."""
    with store.session() as s:
        result = s.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE_STATUSES))
            .values(status="cancelled", finished_at=utcnow(), lease_expires_at=None)
        )
        if _rowcount(result) == 1:
            end_attempt(s, job_id, "cancelled")
            s.execute(insert(JobLog).values(job_id=job_id, message="cancelled"))
            return True
    return False


def status_of(store: Store, job_id: uuid.UUID) -> str | None:
    """The job's current status (None if it does not exist)."""
    with store.session(write=False) as s:
        return s.scalar(select(jobs.c.status).where(jobs.c.id == job_id))
