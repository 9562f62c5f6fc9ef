"""Users and keys (admin), and the caller's own identity."""

from __future__ import annotations

from fastapi import APIRouter

from crosspatch.app.api.params import KeyId, UserNameParam
from crosspatch.app.deps import AdminUser, CurrentUser, ReadSessionDep, SessionDep
from crosspatch.app.schemas.users import (
    KeyCreate,
    KeyCreated,
    KeyPublic,
    KeysPublic,
    UserCreate,
    UserPublic,
    UsersPublic,
)
from crosspatch.app.services import users as service

router = APIRouter(tags=["users"])


@router.get("/me", response_model=UserPublic)
def me(user: CurrentUser) -> UserPublic:
    """Who this API key belongs to."""
    return UserPublic.model_validate(user)


@router.get("/admin/users", response_model=UsersPublic)
def list_users(session: ReadSessionDep, _admin: AdminUser) -> UsersPublic:
    """Every user with their role (admin)."""
    rows = service.list_users(session)
    return UsersPublic(data=[UserPublic.model_validate(u) for u in rows], count=len(rows))


@router.post("/admin/users", status_code=201, response_model=UserPublic)
def create_user(body: UserCreate, session: SessionDep, _admin: AdminUser) -> UserPublic:
    """Add a user (admin); give them a key with POST /admin/users/{name}/keys. 409 if the name is taken."""
    return UserPublic.model_validate(service.create_user(session, body.name, body.role))


@router.get("/admin/users/{name}/keys", response_model=KeysPublic)
def list_keys(name: UserNameParam, session: ReadSessionDep, _admin: AdminUser) -> KeysPublic:
    """A user's API keys: prefixes, labels, revocation times; never the keys (admin)."""
    rows = service.list_keys(session, name)
    return KeysPublic(data=[KeyPublic.model_validate(k) for k in rows], count=len(rows))


@router.post("/admin/users/{name}/keys", status_code=201, response_model=KeyCreated)
def create_key(name: UserNameParam, body: KeyCreate, session: SessionDep, _admin: AdminUser) -> KeyCreated:
    """A new API key for `name`, shown this once."""
    row, key = service.create_key(session, name, body.label)
    return KeyCreated(**KeyPublic.model_validate(row).model_dump(), key=key)


@router.post("/admin/keys/{key_id}/revoke", response_model=KeyPublic)
def revoke_key(key_id: KeyId, session: SessionDep, _admin: AdminUser) -> KeyPublic:
    """Revoke a key at once (admin); idempotent."""
    return KeyPublic.model_validate(service.revoke_key(session, key_id))
