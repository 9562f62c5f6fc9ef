"""Worker side of the shared cache: reuse a computed directory for a job, or store what the job computed.

`SharedCache.reuse_or_compute(ctx, kind, material, out, compute)`: on a hit (an entry with the same content
key that the job's owner may reuse, see `app.services.cache`) the entry's files are hard-linked into `out`
and `compute` only reloads them (the resumable steps find their finished outputs); on a miss `compute`
runs and `out` is hard-linked into a new entry, then the cache is trimmed to its cap (LRU). The job's
provenance records `shared_cache[kind] = {key, hit, ...}`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from crosspatch.app.services.cache import content_key, evict_lru, find_entry
from crosspatch.app.store.models import CacheEntry, Job, utcnow
from crosspatch.app.store.session import Store

if TYPE_CHECKING:
    from crosspatch.app.worker.context import JobContext

T = TypeVar("T")


def _link_tree(src: Path, dst: Path) -> int:
    """Hard-link (copy across file systems) every file of `src` under `dst`; returns the bytes."""
    size = 0
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copy2(path, target)
            size += path.stat().st_size
    return size


def _summarise(records: dict[str, Any]) -> None:
    """A job's per-chunk records summed up: `key` over the chunk keys in order, `hit` when all hit."""
    chunks = [records["chunks"][name] for name in sorted(records["chunks"])]
    records["key"] = content_key({"chunks": [c["key"] for c in chunks]})
    records["hit"] = all(c["hit"] for c in chunks)


class SharedCache:
    """Content-addressed directories under `root`, indexed in the job store, capped at `cap_bytes`."""

    def __init__(self, store: Store, root: Path, cap_bytes: int) -> None:
        self.store, self.root, self.cap_bytes = store, root, cap_bytes

    def reuse_or_compute(
        self,
        ctx: JobContext,
        kind: str,
        material: dict[str, Any],
        out: Path,
        compute: Callable[[], T],
        chunk: str | None = None,
    ) -> T:
        """`compute()`'s result, with `out` filled from a reusable entry first when there is one.

        `chunk`: one of a job's per-chunk entries; provenance `shared_cache[kind]` then holds each chunk's
        record under `chunks`, and `key` (a hash of the chunk keys in order) and `hit` (every chunk hit).
        """
        key = content_key({"kind": kind, **material})
        record: dict[str, Any] = {"key": key, "hit": False}
        records = ctx.provenance.setdefault("shared_cache", {})
        if chunk is None:
            records[kind] = record
        else:
            records.setdefault(kind, {"chunks": {}})["chunks"][chunk] = record
        if self.cap_bytes <= 0:
            record["disabled"] = True
            return compute()
        with self.store.session() as s:
            owner_id = s.scalar(select(Job.owner_id).where(Job.id == ctx.job_id))
            entry = find_entry(s, key, owner_id)
            if entry is not None and Path(entry.path).is_dir():
                _link_tree(Path(entry.path), out)
                entry.hits += 1
                entry.last_used_at = utcnow()
                record.update(hit=True, from_job=str(entry.job_id), entry_owner=entry.owner_id)
        if chunk is not None:
            _summarise(records[kind])
        if record["hit"]:
            ctx.log(f"shared cache: {kind} {key[:12]} reused from job {record['from_job']}")
            return compute()
        result = compute()
        self._store(ctx, kind, key, record, material, out, owner_id)
        return result

    def _store(
        self,
        ctx: JobContext,
        kind: str,
        key: str,
        record: dict[str, Any],
        material: dict[str, Any],
        out: Path,
        owner_id: int | None,
    ) -> None:
        """Hard-link `out` into a new entry owned by the job's owner, then trim the cache to its cap.

        Nothing is stored when `compute` left `out` absent (e.g. a state larger than the whole cache)."""
        if not out.is_dir():
            record["stored_bytes"] = 0
            return
        entry_dir = self.root / f"{key}-{owner_id}"
        size = _link_tree(out, entry_dir)
        try:
            with self.store.session() as s:
                s.add(
                    CacheEntry(
                        key=key,
                        kind=kind,
                        pair_id=material.get("pair_id"),
                        owner_id=owner_id,
                        job_id=ctx.job_id,
                        path=str(entry_dir),
                        size_bytes=size,
                        settings=material.get("settings", {}),
                    )
                )
        except IntegrityError:  # another job of this owner stored the same key meanwhile: keep theirs
            return
        with self.store.session() as s:
            evicted = evict_lru(s, self.cap_bytes)
        record["stored_bytes"] = size
        if evicted:
            ctx.log(f"shared cache: evicted {len(evicted)} least recently used entr(y/ies) past the cap")
