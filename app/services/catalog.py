"""Dictionaries: list, show, register a local path under the dictionary roots."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from crosspatch.app.config import Settings
from crosspatch.app.errors import Conflict, Invalid, NotFound
from crosspatch.app.schemas.dictionaries import DictionaryCreate
from crosspatch.app.services.paths import resolve_under
from crosspatch.app.store.models import Dictionary, Pair, User


def list_dictionaries(session: Session, family: str | None, limit: int, offset: int) -> list[Dictionary]:
    q = select(Dictionary).order_by(Dictionary.created_at.desc()).limit(limit).offset(offset)
    if family:
        q = q.where(Dictionary.family == family)
    return list(session.scalars(q))


def get_dictionary(session: Session, dictionary_id: str) -> Dictionary:
    d = session.get(Dictionary, dictionary_id)
    if d is None:
        raise NotFound(f"no dictionary {dictionary_id!r}")
    return d


def register(session: Session, settings: Settings, user: User, body: DictionaryCreate) -> Dictionary:
    """Record a dictionary saved on disk (sae_lens layout: cfg.json + weights) under the roots."""
    if session.get(Dictionary, body.id) is not None:
        raise Conflict(f"dictionary {body.id!r} already exists")
    path = resolve_under(body.path, settings.dictionary_roots, "path")
    if not (path / "cfg.json").is_file():
        raise Invalid("path", "a dictionary directory needs a cfg.json (sae_lens format)")
    if body.pair_id is not None and session.get(Pair, body.pair_id) is None:
        raise Invalid("pair_id", f"unknown pair {body.pair_id!r}")
    if body.k is not None and body.k > body.width:
        raise Invalid("k", f"k={body.k} exceeds width {body.width}")
    d = Dictionary(**body.model_dump(exclude={"path"}), path=str(path), created_by=user.id)
    session.add(d)
    session.flush()
    return d
