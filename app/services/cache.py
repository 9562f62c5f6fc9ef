"""The shared cache of computed states (dictionaries with activation caches, residuals): keys, access, LRU.

An entry is content-addressed: `content_key` hashes everything the state depends on (pair weights and
tokenizer fingerprints, prompt set, settings), so any later job with the same inputs may reuse it. Access
follows the results it came from: an entry is visible to its owner, to admins, and to everyone when its
source job's results are shared with the lab (`jobs.share == "lab"`); a researcher never lists or reuses
another's private job's states. Past `Settings.shared_cache_bytes` the least recently used entries go.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from crosspatch.app.store.models import CacheEntry, Job, User

log = logging.getLogger(__name__)


def content_key(material: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything a cached state depends on."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def digest(items: Any) -> str:
    """A short hash of a JSON-able value (prompt sets, event lists) for a key's material."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _visible_to(user_id: int | None, is_admin: bool) -> ColumnElement[bool]:
    """Entries `user_id` may list or reuse: their own, or from a job shared with the lab (admins: all)."""
    if is_admin:
        return CacheEntry.id.is_not(None)
    shared = CacheEntry.job_id.in_(select(Job.id).where(Job.share == "lab"))
    return or_(CacheEntry.owner_id == user_id, and_(CacheEntry.owner_id.is_not(None), shared))


def find_entry(session: Session, key: str, owner_id: int | None) -> CacheEntry | None:
    """The most recently used entry with `key` that `owner_id`'s jobs may reuse, or None."""
    user = session.get(User, owner_id) if owner_id is not None else None
    is_admin = user is not None and user.role == "admin"
    query = (
        select(CacheEntry)
        .where(CacheEntry.key == key, _visible_to(owner_id, is_admin))
        .order_by(CacheEntry.last_used_at.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def list_entries(session: Session, user: User, pair_id: str | None = None) -> list[dict[str, Any]]:
    """The cache entries `user` may see (admins: all), most recently used first."""
    query = select(CacheEntry).where(_visible_to(user.id, user.role == "admin"))
    if pair_id is not None:
        query = query.where(CacheEntry.pair_id == pair_id)
    rows = session.scalars(query.order_by(CacheEntry.last_used_at.desc())).all()
    return [
        {
            "key": r.key,
            "kind": r.kind,
            "pair_id": r.pair_id,
            "owner_id": r.owner_id,
            "job_id": r.job_id,
            "size_bytes": r.size_bytes,
            "hits": r.hits,
            "settings": r.settings,
            "created_at": r.created_at,
            "last_used_at": r.last_used_at,
        }
        for r in rows
    ]


def evict_lru(session: Session, cap_bytes: int) -> list[str]:
    """Delete least recently used entries (rows and files) until the total is within `cap_bytes`."""
    rows = session.scalars(select(CacheEntry).order_by(CacheEntry.last_used_at, CacheEntry.id)).all()
    total = sum(r.size_bytes for r in rows)
    evicted: list[str] = []
    for row in rows:
        if total <= cap_bytes:
            break
        total -= row.size_bytes
        evicted.append(row.key)
        shutil.rmtree(row.path, ignore_errors=True)  # jobs that reused it hold hard links, not this path
        session.delete(row)
        log.info("shared cache: evicted %s (%s, %d bytes)", row.key[:12], row.kind, row.size_bytes)
    return evicted
