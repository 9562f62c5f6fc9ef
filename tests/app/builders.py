"""Builders for the service tests: users, pairs and jobs straight in the job store."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from crosspatch.app.store.models import Job, Pair, User, utcnow
from crosspatch.app.store.session import Store

if TYPE_CHECKING:
    import pyarrow as pa

    from crosspatch.app.config import Settings
    from crosspatch.app.store.duckdb import ResultsStore
    from crosspatch.engine.pairs import ModelPair


def make_user(store: Store, name: str, role: str = "researcher") -> int:
    with store.session() as s:
        user = User(name=name, role=role)
        s.add(user)
        s.flush()
        return user.id


def make_pair(store: Store, pair_id: str = "tiny-llama", n_layers: int = 5, memory: int = 0) -> str:
    with store.session() as s:
        s.add(
            Pair(
                pair_id=pair_id,
                family="llama",
                pt="/models/pt",
                it="/models/it",
                n_layers=n_layers,
                default_boundary=3,
                estimated_memory_bytes=memory,
            )
        )
    return pair_id


def make_job(store: Store, owner_id: int, pair_id: str | None = None, **overrides: Any) -> uuid.UUID:
    """A queued crosspatch job; each call is a little younger than the last."""
    fields: dict[str, Any] = dict(
        owner_id=owner_id,
        kind="crosspatch",
        spec={"kind": "crosspatch"},
        status="queued",
        pair_id=pair_id,
        created_at=utcnow() + timedelta(microseconds=len(_made)),
    )
    fields.update(overrides)
    with store.session() as s:
        job = Job(**fields)
        s.add(job)
        s.flush()
        _made.append(job.id)
        return job.id


_made: list[uuid.UUID] = []


def schema_row(schema: pa.Schema, **fields: object) -> dict[str, object]:
    """One row of `schema`: every column null, family llama, pair p, dictionary d, then `fields`."""
    return {**dict.fromkeys(schema.names), "family": "llama", "pair_id": "p", "dictionary_id": "d", **fields}


def rows_where(rows: list[dict[str, Any]], **equal: object) -> list[dict[str, Any]]:
    """The rows whose columns equal `equal` (e.g. summaries at level="pair", headline=True, subset="all")."""
    return [r for r in rows if all(r[k] == v for k, v in equal.items())]


def effect_row(**fields: Any) -> dict[str, Any]:
    """One FEATURE_EFFECTS_SCHEMA row: an attribution score of latent None unless `fields` say otherwise."""
    row: dict[str, Any] = dict(
        family="llama",
        pair_id="p",
        dictionary_id="d",
        layer=3,
        intervention="attribution",
        k=1,
        latent=None,
        statistic="attribution_score",
        effect=0.0,
        ci_low=None,
        ci_high=None,
        n=10,
    )
    return {**row, **fields}


def run_job_in_process(settings: Settings, pair: ModelPair, spec: dict[str, Any]) -> tuple[Job, ResultsStore]:
    """Run one job of `spec` on a warm in-process worker holding `pair` (user 'ada', the pair
    registered), ingest it into the DuckDB file; returns the finished (detached) job and the store."""
    from crosspatch.app.queue import ops
    from crosspatch.app.services.ingest import ingest_job
    from crosspatch.app.store.duckdb import ResultsStore
    from crosspatch.app.store.migrate import upgrade
    from crosspatch.app.worker.main import Worker

    upgrade(settings.database_url)
    worker = Worker(settings)
    worker._pair, worker._pair_id = pair, pair.pair_id
    owner = make_user(worker.store, "ada")
    make_pair(worker.store, pair.pair_id)
    job_id = make_job(worker.store, owner, pair.pair_id, spec=spec)
    assert ops.claim(worker.store, worker.worker_id, lease_seconds=30.0, loaded_pair=pair.pair_id) == job_id
    worker.run_one(job_id)
    results = ResultsStore(settings.data_dir / "results.duckdb")
    assert ingest_job(worker.store, results, job_id) == "succeeded"
    with worker.store.session(write=False) as s:
        job = s.get(Job, job_id)
        s.expunge(job)
    worker.store.dispose()
    return job, results
