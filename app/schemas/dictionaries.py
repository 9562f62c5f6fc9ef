"""Sparse dictionaries known to the service."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from crosspatch.app.schemas.common import Text
from crosspatch.app.schemas.jobs import Name


class DictionaryCreate(BaseModel):
    """Register a dictionary saved (sae_lens format) under a configured dictionary root."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: Name
    path: Text = Field(min_length=1, max_length=1024)
    pair_id: Name | None = None
    family: Text = Field(min_length=1, max_length=32)
    model_role: Literal["PT", "IT", "paired"] = "IT"
    layer: int = Field(ge=0, le=1024)
    hook_point: Text = Field(min_length=1, max_length=128)
    kind: Text = Field(default="sae", max_length=32)
    architecture: Text = Field(default="topk", max_length=32)
    width: int = Field(ge=1, le=1 << 24)
    k: float | None = Field(
        default=None, gt=0, le=1 << 16, description="Active latents per token (may be fractional)."
    )
    training_tokens: int | None = Field(default=None, ge=0, le=2**63 - 1)
    metrics: dict[Annotated[Text, Field(max_length=128)], float] = Field(default_factory=dict, max_length=64)


class DictionaryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    pair_id: str | None
    family: str
    model_role: str
    layer: int
    hook_point: str
    kind: str
    architecture: str
    width: int
    k: float | None
    training_tokens: int | None
    metrics: dict[str, Any]
    gate_status: str
    path: str
    created_at: datetime


class DictionariesPublic(BaseModel):
    data: list[DictionaryPublic]
    count: int
