"""Scheduling policy: which queued job a worker gets next, as one SQL ordering.

1. fair share: the owner whose last claim is oldest (or who never had one) goes next, so owners take
   turns (round-robin) however many jobs each has queued, whatever priorities they set;
2. higher `priority` first (so it orders an owner's own jobs; researchers may only lower theirs);
3. a job on the pair this worker already has loaded, before one that needs a reload;
4. oldest first.
A job whose estimated memory exceeds the worker's is never offered to it (the estimate: engine.admission at
submit, the staged peak for a job that may run staged; the worker's: its admission budget or device memory).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, Select, Table, case, func, or_, select

from crosspatch.app.store.models import Job

NEVER = datetime(1970, 1, 1)


def candidate(memory_bytes: int | None, loaded_pair: str | None) -> tuple[Select, Table]:
    """SELECT the id of the next job for a worker (LIMIT 1), and the alias it selects from."""
    jobs = Job.__table__
    cand = jobs.alias("cand")
    mine = jobs.alias("mine")
    owner_last_claim = (
        select(func.max(mine.c.claimed_at)).where(mine.c.owner_id == cand.c.owner_id).scalar_subquery()
    )
    where: list[ColumnElement[bool]] = [cand.c.status == "queued"]
    if memory_bytes is not None:
        where.append(or_(cand.c.estimated_memory_bytes <= memory_bytes, cand.c.estimated_memory_bytes == 0))
    pair_first = case((cand.c.pair_id == loaded_pair, 0), else_=1) if loaded_pair else None
    order = [func.coalesce(owner_last_claim, NEVER), cand.c.priority.desc()]
    if pair_first is not None:
        order.append(pair_first)
    order += [cand.c.created_at, cand.c.id]
    return select(cand.c.id).where(*where).order_by(*order).limit(1), cand
