"""Users and API keys (admin operations)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from crosspatch.app import auth
from crosspatch.app.config import Settings
from crosspatch.app.errors import Conflict, NotFound
from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.models import ApiKey, User
from crosspatch.app.store.session import Store


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


def bootstrap_users(settings: Settings, names: dict[str, str]) -> dict[str, str]:
    """Create users {name: role} with one key each in the (migrated) job store; returns name -> key."""
    assert settings.database_url is not None
    upgrade(settings.database_url)
    store = Store.from_settings(settings)
    keys = {}
    try:
        with store.session() as s:
            for name, role in names.items():
                create_user(s, name, role)
                _, keys[name] = create_key(s, name)
    finally:
        store.dispose()
    return keys
