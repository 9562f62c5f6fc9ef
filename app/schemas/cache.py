"""The shared cache of computed states (dictionaries with their activation caches), as listed by GET /cache."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class CacheEntryPublic(BaseModel):
    """One cached state: its content key, what it is, whose job computed it, size and use."""

    key: str = Field(
        description="sha256 of the pair's weight/tokenizer fingerprints, prompt set and settings."
    )
    kind: str = Field(
        description="What is cached: 'dictionary' (a trained dictionary + its activation cache)."
    )
    pair_id: str | None
    owner_id: int | None = Field(description="The researcher whose job computed it.")
    job_id: uuid.UUID | None = Field(
        description="That job; its results' share decides who may reuse the entry."
    )
    size_bytes: int
    hits: int = Field(description="Later jobs that reused it instead of recomputing.")
    settings: dict[str, Any] = Field(
        description="The settings the key covers (dictionary options, role, dtype)."
    )
    created_at: datetime
    last_used_at: datetime = Field(
        description="Eviction past the size cap removes the least recently used first."
    )


class CacheEntriesPublic(BaseModel):
    data: list[CacheEntryPublic]
    count: int
    total_bytes: int
