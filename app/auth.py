"""API keys: random, shown once, stored as a SHA-256 hash found by a short per-key prefix."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from crosspatch.app.store.models import ApiKey, User, utcnow

KEY_PREFIX = "cpk"
PREFIX_CHARS = 12


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its lookup prefix: `cpk_<prefix>_<secret>`."""
    prefix = secrets.token_hex(PREFIX_CHARS // 2)
    return f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}", prefix


def issue_key(session: Session, user: User, label: str = "") -> tuple[ApiKey, str]:
    """Create a key for `user`; returns the row and the plain key (the only time it exists)."""
    key, prefix = new_key()
    row = ApiKey(user_id=user.id, prefix=prefix, key_hash=hash_key(key), label=label)
    session.add(row)
    session.flush()
    return row, key


def parse_prefix(key: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != PREFIX_CHARS:
        return None
    return parts[1]


def authenticate(session: Session, key: str) -> User | None:
    """The active user owning the unrevoked `key`, or None (constant-time hash comparison)."""
    prefix = parse_prefix(key)
    if prefix is None:
        return None
    found = session.execute(
        select(ApiKey, User).join(User, User.id == ApiKey.user_id).where(ApiKey.prefix == prefix)
    ).first()  # one query per request: the key and its user
    if found is None:
        return None
    row, user = found
    if row.revoked_at is not None or not hmac.compare_digest(row.key_hash, hash_key(key)):
        return None
    if not user.active:
        return None
    return user


def revoke(session: Session, key_id: int) -> ApiKey | None:
    """Mark key `key_id` revoked; None if there is no such key."""
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
    return row
