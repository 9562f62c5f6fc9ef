"""The shared cache of computed states: what is cached, for whom."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from crosspatch.app.deps import CurrentUser, ReadSessionDep
from crosspatch.app.schemas.cache import CacheEntriesPublic, CacheEntryPublic
from crosspatch.app.services import cache as service

router = APIRouter(prefix="/cache", tags=["cache"])


@router.get("", response_model=CacheEntriesPublic)
def list_cache(
    session: ReadSessionDep,
    user: CurrentUser,
    pair_id: Annotated[str | None, Query(max_length=64, description="Only this pair's entries.")] = None,
) -> CacheEntriesPublic:
    """Cached states the caller may reuse (dictionaries with activation caches, a 2x2 chunk's residuals):
    their own and those of jobs shared with the lab (admins: all), most recently used first."""
    rows = [CacheEntryPublic.model_validate(r) for r in service.list_entries(session, user, pair_id)]
    return CacheEntriesPublic(data=rows, count=len(rows), total_bytes=sum(r.size_bytes for r in rows))
