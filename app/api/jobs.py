"""Jobs: submit, list, get, cancel, retry, delete, logs, progress stream (SSE)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import StreamingResponse

from crosspatch.app.api.params import Offset
from crosspatch.app.deps import (
    CurrentUser,
    OwnedJob,
    ReadableJob,
    ReadSessionDep,
    ResultsDep,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from crosspatch.app.schemas.examples import JOB_CREATE_EXAMPLES
from crosspatch.app.schemas.jobs import (
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
    return service.to_public(session, service.submit(session, settings, user, body))


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: ReadSessionDep,
    user: CurrentUser,
    mine: bool = False,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> JobsPublic:
    """All jobs (or only mine), newest first."""
    data, count = service.list_jobs(session, user, mine=mine, status=status, limit=limit, offset=offset)
    return JobsPublic(data=data, count=count)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job: ReadableJob, session: ReadSessionDep) -> JobPublic:
    """One job: status, progress, error."""
    return service.to_public(session, job)


@router.get("/{job_id}/status", response_model=JobStatusPublic)
def get_job_status(job: ReadableJob) -> JobStatusPublic:
    """A job's status, progress and error without its spec (for polling: `crosspatch wait` uses it)."""
    return JobStatusPublic.model_validate(job)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job: OwnedJob, session: SessionDep, user: CurrentUser) -> JobPublic:
    """Cancel (owner or admin); a running job stops within seconds."""
    return service.to_public(session, service.cancel(session, job.id, user))


@router.post("/{job_id}/retry", response_model=JobPublic)
def retry_job(job: OwnedJob, session: SessionDep, user: CurrentUser) -> JobPublic:
    """Queue a failed or cancelled job again (owner or admin); it resumes from finished parts."""
    return service.to_public(session, service.retry(session, job.id, user))


@router.delete("/{job_id}", status_code=204)
def delete_job(job: OwnedJob, session: SessionDep, settings: SettingsDep, results: ResultsDep) -> Response:
    """Delete a finished job and its results (owner or admin)."""
    service.delete(session, settings, results, job.id)
    return Response(status_code=204)


@router.get("/{job_id}/logs", response_model=JobLogsPublic)
def job_logs(
    job: ReadableJob,
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
async def job_progress(job: ReadableJob, request: Request, store: StoreDep) -> StreamingResponse:
    """Server-sent events: one `progress` event per change, then `end` when the job finishes."""
    job_id = job.id

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

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
