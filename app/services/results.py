"""Reading a job's results and features from the DuckDB store (fixed, parameterised queries)."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from crosspatch.app.errors import Conflict, NotFound
from crosspatch.app.schemas.results import ProvenancePublic, Rows
from crosspatch.app.store.duckdb import ResultsStore, to_parquet_bytes
from crosspatch.app.store.models import Job
from crosspatch.app.store.result_tables import with_descriptions

Filter = str | int | float | bool | None  # one query filter value (None: not filtered)


def _finished(job: Job) -> None:
    if job.status != "succeeded":
        raise Conflict(f"job {job.id} is {job.status}; results exist once it has succeeded")


def _clean(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """NaN/inf are not JSON: send them as null."""
    for row in rows:
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                row[k] = None
    return rows


def to_rows(name: str, table: pa.Table) -> Rows:
    return Rows(table=name, data=_clean(table.to_pylist()), count=table.num_rows)


def table_rows(results: ResultsStore, job: Job, table: str, *, limit: int, offset: int) -> Rows:
    _finished(job)
    return to_rows(table, results.job_table(table, str(job.id), limit=limit, offset=offset))


def table_parquet(results: ResultsStore, job: Job, table: str, *, limit: int, offset: int) -> bytes:
    _finished(job)
    rows = results.job_table(table, str(job.id), limit=limit, offset=offset)
    return to_parquet_bytes(with_descriptions(table, rows))  # column meanings travel with the file


def provenance(results: ResultsStore, job: Job) -> ProvenancePublic:
    _finished(job)
    prov = results.provenance(str(job.id))
    if prov is None:
        raise NotFound(f"no provenance stored for job {job.id}")
    return ProvenancePublic(**prov)


def top_features(results: ResultsStore, **filters: Filter) -> Rows:
    return to_rows("top_features", results.query("top_features", **filters))


def feature(results: ResultsStore, dictionary_id: str, latent: int, family: str | None, limit: int) -> Rows:
    return to_rows(
        "feature_acts",
        results.query(
            "feature_across_events", dictionary_id=dictionary_id, latent=latent, family=family, limit=limit
        ),
    )


def feature_upstream(results: ResultsStore, **filters: Filter) -> Rows:
    return to_rows("feature_upstream", results.query("feature_upstream", **filters))


def ablation_curve(results: ResultsStore, family: str | None, statistic: str) -> Rows:
    return to_rows("ablation_curve", results.query("ablation_curve", family=family, statistic=statistic))


def compare_families(
    results: ResultsStore,
    readout: str,
    boundary: int | None = None,
    pair_id: str | None = None,
    subset: str = "all",
) -> Rows:
    return to_rows(
        "compare_families",
        results.query("compare_families", readout=readout, subset=subset, boundary=boundary, pair_id=pair_id),
    )
