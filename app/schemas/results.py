"""Results: rows of a job's tables, top features, one feature across events."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from crosspatch.app.schemas.examples import ROWS_EXAMPLE


class Rows(BaseModel):
    """Rows of one results table (column name -> value per row)."""

    model_config = ConfigDict(json_schema_extra={"examples": [ROWS_EXAMPLE]})

    table: str
    data: list[dict[str, Any]]
    count: int


class ProvenancePublic(BaseModel):
    kind: str
    spec: dict[str, Any]
    provenance: dict[str, Any] | None


class FigurePublic(BaseModel):
    """One PNG figure of a job; fetch it at `url`."""

    name: str
    url: str
    bytes: int


class FiguresPublic(BaseModel):
    data: list[FigurePublic]
    count: int
