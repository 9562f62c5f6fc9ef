"""The allow-list of PT/IT pairs."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from crosspatch.app.schemas.common import Text
from crosspatch.app.schemas.jobs import Name


class PairCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "pair_id": "gemma3-1b",
                    "family": "gemma3",
                    "pt": "google/gemma-3-1b-pt",
                    "it": "google/gemma-3-1b-it",
                    "n_layers": 26,
                }
            ]
        },
    )

    pair_id: Name
    family: Text = Field(min_length=1, max_length=32)
    pt: Text = Field(
        min_length=1, max_length=512, description="Hub id or a local directory under the model roots."
    )
    it: Text = Field(min_length=1, max_length=512)
    n_layers: int | None = Field(default=None, ge=1, le=1024)
    default_boundary: int | None = Field(default=None, ge=0, le=1024)
    pt_revision: Text | None = Field(default=None, max_length=128)
    it_revision: Text | None = Field(default=None, max_length=128)


class PairPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    pair_id: str
    family: str
    pt: str
    it: str
    n_layers: int
    default_boundary: int
    pt_revision: str | None
    it_revision: str | None
    estimated_memory_bytes: int
    created_at: datetime


class PairsPublic(BaseModel):
    data: list[PairPublic]
    count: int
