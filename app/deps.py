"""FastAPI dependencies as `Annotated` aliases: settings, stores, sessions, the caller, owned jobs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, Path, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, defer

from crosspatch.app import auth
from crosspatch.app.config import Settings
from crosspatch.app.errors import Forbidden, NotFound, Unauthorized
from crosspatch.app.store.duckdb import ResultsStore
from crosspatch.app.store.models import Job, User
from crosspatch.app.store.session import Store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_results(request: Request) -> ResultsStore:
    return request.app.state.results


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
ResultsDep = Annotated[ResultsStore, Depends(get_results)]


# Sessions are created in the event loop (a Session does no I/O until its first query) and finished
# (commit or rollback, then close) on threads of their own limiter, never queued behind request threads.
# Under load every request thread can be blocked on the database: a SQLite writer waiting for the write
# lock, a reader waiting for a pooled connection. The transaction that holds the lock or the
# connection must still be able to finish, or everyone waits out the busy timeout.
FINISH_THREADS = 8


def _finish_limiter(request: Request) -> anyio.CapacityLimiter:
    limiter = getattr(request.app.state, "session_finish_limiter", None)
    if limiter is None:  # created lazily: a limiter belongs to the running event loop
        limiter = request.app.state.session_finish_limiter = anyio.CapacityLimiter(FINISH_THREADS)
    return limiter


def _commit(session: Session) -> None:
    with session:
        session.commit()


def _rollback(session: Session) -> None:
    with session:
        session.rollback()


async def _finish(request: Request, finish: Callable[[Session], None], session: Session) -> None:
    with anyio.CancelScope(shield=True):  # a cancelled request still returns its connection
        await anyio.to_thread.run_sync(finish, session, limiter=_finish_limiter(request))


async def _transaction(session: Session, request: Request) -> AsyncIterator[Session]:
    """One transaction for the route: rolled back if it raises, else committed before the response
    (for a read session the commit just ends the read; unlike a rollback, it expires nothing)."""
    session.begin()
    try:
        yield session
    except BaseException:
        await _finish(request, _rollback, session)
        raise
    await _finish(request, _commit, session)


async def get_session(store: StoreDep, request: Request) -> AsyncIterator[Session]:
    """A write session: one transaction, committed when the route returns (before the response)."""
    async for session in _transaction(store.sessions(), request):
        yield session


async def get_read_session(store: StoreDep, request: Request) -> AsyncIterator[Session]:
    """A read session (on SQLite: never waits for the writer)."""
    async for session in _transaction(store.read_sessions(), request):
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]


# Declared as OpenAPI security schemes, so /docs "Authorize" sends the key either way.
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="APIKeyBearer",
    bearerFormat="crosspatch API key (cpk_...)",
    description="An API key from `crosspatch admin create-key`, sent as `Authorization: Bearer <key>`.",
)
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="APIKeyHeader",
    description="The same API key in an `X-API-Key` header.",
)


def get_current_user(
    session: ReadSessionDep,
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
    x_api_key: Annotated[str | None, Security(API_KEY_HEADER)] = None,
) -> User:
    """The user of the API key in `Authorization: Bearer <key>` or `X-API-Key`."""
    key = x_api_key
    authorization = request.headers.get("authorization")  # raw: a wrong scheme gets a clear 401
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise Unauthorized("use 'Authorization: Bearer <api key>'")
        key = value.strip()
    if not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <api key>'")
    user = auth.authenticate(session, key)
    if user is None:
        raise Unauthorized("invalid or revoked API key")
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def get_admin(user: CurrentUser) -> User:
    if user.role != "admin":
        raise Forbidden("this needs the admin role")
    return user


AdminUser = Annotated[User, Depends(get_admin)]


def get_job(job_id: Annotated[uuid.UUID, Path()], session: ReadSessionDep, user: CurrentUser) -> Job:
    """A job whose status and results the caller may read: any job shared with the lab (the default),
    else only the owner's or an admin's."""
    # spec and provenance (large JSON: inline prompts) load only if the route reads them
    job = session.get(Job, job_id, options=[defer(Job.spec), defer(Job.provenance)])
    if job is None:
        raise NotFound(f"no job {job_id}")
    if job.share == "owner" and job.owner_id != user.id and user.role != "admin":
        raise Forbidden("this job's results are shared with its owner only")
    return job


ReadableJob = Annotated[Job, Depends(get_job)]


def get_private_job(job: ReadableJob, user: CurrentUser, settings: SettingsDep) -> Job:
    """A job whose spec, prompts and logs the caller may read (CROSSPATCH_JOB_VISIBILITY)."""
    from crosspatch.app.services.jobs import may_see_private

    if not may_see_private(job, user, settings):
        raise Forbidden("this server shows a job's spec, prompts and logs only to its owner and admins")
    return job


PrivateJob = Annotated[Job, Depends(get_private_job)]


def get_owned_job(job: ReadableJob, user: CurrentUser) -> Job:
    """A job the caller may change: their own, or any for an admin."""
    if job.owner_id != user.id and user.role != "admin":
        raise Forbidden("only the job's owner or an admin may do this")
    return job


OwnedJob = Annotated[Job, Depends(get_owned_job)]
