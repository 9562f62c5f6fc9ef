"""Jobs: submit, list, get, cancel, retry, delete, logs, progress stream (SSE)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from crosspatch.app.api.params import Offset
from crosspatch.app.deps import (
    CurrentUser,
    OwnedJob,
    PrivateJob,
    ReadableJob,
    ReadSessionDep,
    ResultsDep,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from crosspatch.app.errors import QuotaExceeded
from crosspatch.app.queue import ops
from crosspatch.app.schemas.examples import JOB_CREATE_EXAMPLES
from crosspatch.app.schemas.jobs import (
    JobAttemptPublic,
    JobAttemptsPublic,
    JobCreate,
    JobLogPublic,
    JobLogsPublic,
    JobPublic,
    JobsPublic,
    JobStatus,
    JobStatusPublic,
)
from crosspatch.app.services import jobs as service
from crosspatch.app.store.models import TERMINAL_STATUSES, Job

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobPublic)
def submit_job(
    body: Annotated[JobCreate, Body(openapi_examples=JOB_CREATE_EXAMPLES)],
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
) -> JobPublic:
    """Submit a job spec (one of six kinds, chosen by `spec.kind`); it is checked against the allow-list
    and the server's limits (422 names the field and the reason; 429 past your quota) and queued."""
    return service.to_public(session, service.submit(session, settings, user, body), user, settings)


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: ReadSessionDep,
    user: CurrentUser,
    settings: SettingsDep,
    mine: bool = False,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> JobsPublic:
    """All jobs (or only mine), newest first; others' specs are redacted unless CROSSPATCH_JOB_VISIBILITY=lab."""
    data, count = service.list_jobs(
        session, user, settings, mine=mine, status=status, limit=limit, offset=offset
    )
    return JobsPublic(data=data, count=count)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job: ReadableJob, session: ReadSessionDep, user: CurrentUser, settings: SettingsDep) -> JobPublic:
    """One job: status, progress, error; its spec only if you may see it (owner, admin, or a lab setting)."""
    return service.to_public(session, job, user, settings)


@router.get("/{job_id}/status", response_model=JobStatusPublic)
def get_job_status(job: ReadableJob) -> JobStatusPublic:
    """A job's status, progress and error without its spec (for polling: `crosspatch wait` uses it)."""
    return JobStatusPublic.model_validate(job)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job: OwnedJob, session: SessionDep, user: CurrentUser, settings: SettingsDep) -> JobPublic:
    """Cancel (owner or admin); a running job stops within seconds (its process is replaced past
    CROSSPATCH_CANCEL_GRACE_SECONDS)."""
    return service.to_public(session, service.cancel(session, job.id, user), user, settings)


@router.post("/{job_id}/retry", response_model=JobPublic)
def retry_job(job: OwnedJob, session: SessionDep, user: CurrentUser, settings: SettingsDep) -> JobPublic:
    """Queue a failed or cancelled job again (owner or admin); it resumes from finished parts."""
    return service.to_public(session, service.retry(session, job.id, user), user, settings)


@router.delete("/{job_id}", status_code=204)
def delete_job(job: OwnedJob, session: SessionDep, settings: SettingsDep, results: ResultsDep) -> Response:
    """Delete a finished job and its results (owner or admin)."""
    service.delete(session, settings, results, job.id)
    return Response(status_code=204)


@router.get("/{job_id}/attempts", response_model=JobAttemptsPublic)
def job_attempts(job: ReadableJob, store: StoreDep) -> JobAttemptsPublic:
    """Every claim of the job, oldest first: its worker, when, and how it ended (kept across retries)."""
    rows = ops.attempts(store, job.id)
    return JobAttemptsPublic(data=[JobAttemptPublic.model_validate(r) for r in rows], count=len(rows))


@router.get("/{job_id}/logs", response_model=JobLogsPublic)
def job_logs(
    job: PrivateJob,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Offset = 0,
) -> JobLogsPublic:
    """The job's log lines, oldest first."""
    rows, count = service.logs(session, job.id, limit=limit, offset=offset)
    return JobLogsPublic(data=[JobLogPublic.model_validate(r) for r in rows], count=count)


@router.get(
    "/{job_id}/progress",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_progress(
    job: ReadableJob, request: Request, store: StoreDep, user: CurrentUser, settings: SettingsDep
) -> StreamingResponse:
    """Server-sent events: one `progress` event per change, then `end` when the job finishes. At most
    CROSSPATCH_MAX_STREAMS_PER_USER open streams per researcher and CROSSPATCH_MAX_STREAMS_TOTAL in all
    (429 past either: poll `/status` instead)."""
    job_id = job.id
    limiter = _stream_limiter(request, settings)
    limiter.acquire(user.id)

    def snapshot() -> dict:
        with store.session(write=False) as s:
            j = s.get(Job, job_id)
            assert j is not None
            return {"status": j.status, "progress": j.progress, "error": j.error}

    async def events() -> AsyncIterator[str]:
        last = None
        while True:
            snap = await asyncio.to_thread(snapshot)
            if snap != last:
                yield f"event: progress\ndata: {json.dumps(snap)}\n\n"
                last = snap
            if snap["status"] in TERMINAL_STATUSES:
                yield f"event: end\ndata: {json.dumps(snap)}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.5)

    return _CountedStream(
        lambda: limiter.release(user.id),
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


class StreamLimiter:
    """Open progress streams, per user and in all (each stream polls the job store: they cost)."""

    def __init__(self, per_user: int, total: int) -> None:
        self.per_user, self.total = per_user, total
        self.open: dict[int, int] = {}

    def acquire(self, user_id: int) -> None:
        """Count one more stream for `user_id`, or refuse with 429 (runs on the event loop: no lock)."""
        if sum(self.open.values()) >= self.total:
            raise QuotaExceeded(
                f"the server holds {self.total} progress streams already; poll /status instead"
            )
        if self.open.get(user_id, 0) >= self.per_user:
            raise QuotaExceeded(
                f"you have {self.per_user} progress streams open, the most allowed; close one or poll /status"
            )
        self.open[user_id] = self.open.get(user_id, 0) + 1

    def release(self, user_id: int) -> None:
        self.open[user_id] -= 1
        if not self.open[user_id]:
            del self.open[user_id]


def _stream_limiter(request: Request, settings: SettingsDep) -> StreamLimiter:
    limiter = getattr(request.app.state, "stream_limiter", None)
    if limiter is None:
        limiter = request.app.state.stream_limiter = StreamLimiter(
            settings.max_streams_per_user, settings.max_streams_total
        )
    return limiter


class _CountedStream(StreamingResponse):
    """A streaming response that releases its stream slot however it ends (done, disconnect, error)."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
