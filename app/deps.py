"""FastAPI dependencies as `Annotated` aliases: settings, stores, sessions, the caller, owned jobs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from sqlalchemy.orm import Session

from app import auth
from app.config import Settings
from app.errors import Forbidden, NotFound, Unauthorized
from app.store.duckdb import ResultsStore
from app.store.models import Job, User
from app.store.session import Store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_results(request: Request) -> ResultsStore:
    return request.app.state.results


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
ResultsDep = Annotated[ResultsStore, Depends(get_results)]


def get_session(store: StoreDep) -> Iterator[Session]:
    """A write session: one transaction, committed when the route returns (before the response)."""
    with store.session() as session:
        yield session


def get_read_session(store: StoreDep) -> Iterator[Session]:
    """A read session (on SQLite: never waits for the writer)."""
    with store.session(write=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]


def get_current_user(
    session: ReadSessionDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> User:
    """The user of the API key in `Authorization: Bearer <key>` or `X-API-Key`."""
    key = x_api_key
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


def get_job(job_id: Annotated[uuid.UUID, Path()], session: ReadSessionDep, _user: CurrentUser) -> Job:
    """Any job, for any authenticated user (everyone in the lab reads all results)."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


ReadableJob = Annotated[Job, Depends(get_job)]


def get_owned_job(job: ReadableJob, user: CurrentUser) -> Job:
    """A job the caller may change: their own, or any for an admin."""
    if job.owner_id != user.id and user.role != "admin":
        raise Forbidden("only the job's owner or an admin may do this")
    return job


OwnedJob = Annotated[Job, Depends(get_owned_job)]
