"""Users and API keys (admin operations)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from crosspatch.app import auth
from crosspatch.app.errors import Conflict, NotFound
from crosspatch.app.store.models import ApiKey, User


def create_user(session: Session, name: str, role: str = "researcher") -> User:
    """Add a user; a taken name is a 409."""
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise Conflict(f"user {name!r} already exists")
    user = User(name=name, role=role)
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user {name!r}")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.id)))


def create_key(session: Session, name: str, label: str = "") -> tuple[ApiKey, str]:
    """A new key for user `name`; the plain key is returned once and never stored."""
    return auth.issue_key(session, get_user(session, name), label)


def list_keys(session: Session, name: str) -> list[ApiKey]:
    user = get_user(session, name)
    return list(session.scalars(select(ApiKey).where(ApiKey.user_id == user.id).order_by(ApiKey.id)))


def revoke_key(session: Session, key_id: int) -> ApiKey:
    """Revoke key `key_id` (idempotent)."""
    row = auth.revoke(session, key_id)
    if row is None:
        raise NotFound(f"no key with id {key_id}")
    return row
