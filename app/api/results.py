"""Results of a job: rows as JSON or a Parquet download, and provenance."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from crosspatch.app.api.params import Offset
from crosspatch.app.deps import PrivateJob, ReadableJob, ResultsDep
from crosspatch.app.schemas.results import ProvenancePublic, Rows
from crosspatch.app.services import results as service

router = APIRouter(prefix="/jobs/{job_id}", tags=["results"])

Table = Literal[
    "cells",
    "summaries",
    "events",
    "feature_acts",
    "feature_effects",
    "gate_checks",
    "handoff",
    "feature_upstream",
    "forced_tokens",
    "forced_summaries",
    "continuation",
    "continuation_summaries",
    "lora_controls",
    # controls of the 2x2
    "interpolation",
    "signperm",
    "offmanifold",
    "boundary_margins",
    "commitment",
    "baseline_cells",
    "baselines",
    "lineage_cells",
    "lineage",
    "recipe_contrasts",
    "anatomy_events",
    "anatomy",
    "identity_transfer_events",
    "identity_transfer",
    "source_decomposition_events",
    "source_decomposition",
    "closure_cells",
    "closure",
]


@router.get(
    "/results/{table}",
    response_model=Rows,
    responses={200: {"content": {"application/vnd.apache.parquet": {}}}},
)
def job_results(
    job: ReadableJob,
    table: Table,
    results: ResultsDep,
    format: Literal["json", "parquet"] = "json",
    limit: Annotated[int, Query(ge=1, le=1_000_000)] = 10_000,
    offset: Offset = 0,
) -> Rows | Response:
    """A finished job's rows of `table`; `format=parquet` downloads them as a Parquet file."""
    if format == "parquet":
        data = service.table_parquet(results, job, table, limit=limit, offset=offset)
        headers = {"Content-Disposition": f'attachment; filename="{job.id}-{table}.parquet"'}
        return Response(data, media_type="application/vnd.apache.parquet", headers=headers)
    return service.table_rows(results, job, table, limit=limit, offset=offset)


@router.get("/provenance", response_model=ProvenancePublic)
def job_provenance(job: PrivateJob, results: ResultsDep) -> ProvenancePublic:
    """The provenance stored beside the job's results (it holds the spec: private like the spec)."""
    return service.provenance(results, job)
