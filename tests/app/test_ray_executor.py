"""The Ray executor on a real local Ray: same rows as the local executor, one warm actor per pair reused by
the next worker's job (also once the worker that started it is gone), a killed actor's chunk re-queued with
every row in DuckDB once, a simulated OOM halved inside the actor with the same rows, and a cancelled job's
chunk stopped in its still-warm actor."""

from __future__ import annotations

import gc
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from crosspatch.app.config import Settings
from crosspatch.app.queue import ops
from crosspatch.app.services.ingest import ingest_job
from crosspatch.app.store.duckdb import ResultsStore
from crosspatch.app.store.layout import parts_dir
from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.models import Job, JobLog, JobPart, Pair
from crosspatch.app.worker.context import OOM_ABOVE_BATCH_ENV
from crosspatch.app.worker.executor import HOLD_CHUNK_ENV, RAY_NAMESPACE, actor_name
from crosspatch.app.worker.main import Worker
from tests.app.builders import make_job, make_user
from tests.helpers import BOUND, random_prompts, save_tiny_pair

ray = pytest.importorskip(
    "ray", reason="Ray is not installed (pip install 'crosspatch[ray]'): Ray tests skipped"
)

PAIR = "tiny-llama"
PROMPTS = [{"id": p.id, "text": p.text, "category": p.category} for p in random_prompts(6, seed=4)]
SPEC = {"kind": "crosspatch", "pair_id": PAIR, "prompts": PROMPTS, "max_new_tokens": 6}
SPEC.update(batch_size=2, chunk_size=2, n_resamples=20, boundary=[2, 3])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One local Ray (2 CPUs, no dashboard) for the module, and the tiny pair saved where actors load it."""
    root = tmp_path_factory.mktemp("ray_models")
    save_tiny_pair(root)
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, namespace=RAY_NAMESPACE, log_to_driver=False
    )
    yield root
    ray.shutdown()


def _settings(tmp_path: Path, models: Path, executor: str) -> Settings:
    settings = Settings(
        data_dir=tmp_path / executor,
        model_roots=[models],
        lease_seconds=30.0,
        heartbeat_seconds=0.5,
        poll_seconds=0.2,
        executor=executor,
        _env_file=None,  # type: ignore[call-arg]
    )
    upgrade(settings.database_url)
    return settings


def _submit(worker: Worker, models: Path) -> uuid.UUID:
    """Register the pair (once per job store) and queue one crosspatch job on it."""
    with worker.store.session() as s:
        if s.get(Pair, PAIR) is None:
            pt, it = str(models / "pt"), str(models / "it")
            s.add(Pair(pair_id=PAIR, family="llama", pt=pt, it=it, n_layers=5, default_boundary=3))
    owner = make_user(worker.store, f"ada-{uuid.uuid4().hex[:6]}")
    return make_job(worker.store, owner, PAIR, spec=SPEC)


def _run(worker: Worker, job_id: uuid.UUID) -> str:
    assert ops.claim(worker.store, worker.worker_id, lease_seconds=30.0) == job_id
    return worker.run_one(job_id)


def _rows(settings: Settings, worker: Worker, job_id: uuid.UUID) -> tuple[dict[str, list[dict]], Job]:
    """Ingest the job; its events and cells rows (job id dropped, sorted) and the job row."""
    results = ResultsStore(settings.data_dir / "results.duckdb")
    assert ingest_job(worker.store, results, job_id) == "succeeded"
    out = {}
    for table in ("events", "cells"):
        rows = results.job_table(table, str(job_id), limit=10_000).to_pylist()
        out[table] = sorted(
            ({k: v for k, v in r.items() if k != "job_id"} for r in rows),
            key=lambda r: tuple(str(r.get(k)) for k in ("prompt_id", "boundary", "readout")),
        )
    results.close()
    with worker.store.session(write=False) as s:
        job = s.get(Job, job_id)
        s.expunge(job)
    return out, job


def _assert_same(got: list[dict], want: list[dict]) -> None:
    """Same rows; floats to 1e-5 (the actor runs torch on 1 thread, the test process on several)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k, v in w.items():
            if isinstance(v, float):
                assert g[k] == pytest.approx(v, abs=1e-5), k
            else:
                assert g[k] == v, k


@pytest.fixture(scope="module")
def local_rows(models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """The same job on the local executor: the reference."""
    settings = _settings(tmp_path_factory.mktemp("local"), models, "local")
    worker = Worker(settings)
    job_id = _submit(worker, models)
    assert _run(worker, job_id) == "ingesting"
    rows, job = _rows(settings, worker, job_id)
    assert job.provenance["executor"] == {"kind": "local"}
    assert len(rows["events"]) == 6 and rows["cells"]
    rows["compute"] = job.provenance["compute"]  # forward calls counted in the worker
    worker.store.dispose()
    return rows


def _actor_info(worker: Worker) -> dict[str, Any]:
    source = replace(worker.pair_source(PAIR), device="cpu")
    return ray.get(ray.get_actor(actor_name(source), namespace=RAY_NAMESPACE).info.remote())


def _ray_job(tmp_path: Path, models: Path, local_rows: dict) -> tuple[Settings, Worker, Job]:
    """One crosspatch job on the Ray executor, its rows checked against the local executor's."""
    settings = _settings(tmp_path, models, "ray")
    worker = Worker(settings)
    job_id = _submit(worker, models)
    assert _run(worker, job_id) == "ingesting"
    rows, job = _rows(settings, worker, job_id)
    _assert_same(rows["events"], local_rows["events"])
    _assert_same(rows["cells"], local_rows["cells"])
    return settings, worker, job


def test_ray_jobs_equal_local_and_reuse_the_warm_actor(
    models: Path, local_rows: dict, tmp_path: Path
) -> None:
    settings, first, job = _ray_job(tmp_path, models, local_rows)
    assert job.provenance["executor"] == {"kind": "ray", "num_gpus": 0.0, "lost_chunks": 0}
    assert job.provenance["noop_checks"][PAIR]["cells"]["passed"]  # the actor's first chunk was checked
    assert job.provenance["compute"] == local_rows["compute"]  # counted in the actor: the same work
    info = _actor_info(first)
    assert info["chunks"] == 3 and info["pid"] != os.getpid()

    # a second worker (another process's view) finds the pair's actor by name: no reload, 3 more chunks
    second = Worker(settings)
    follow = _submit(second, models)
    assert _run(second, follow) == "ingesting"
    again, _ = _rows(settings, second, follow)
    _assert_same(again["cells"], local_rows["cells"])
    assert _actor_info(second) == {**info, "chunks": 6}
    first.store.dispose()
    second.store.dispose()


def test_the_warm_actor_outlives_the_worker_that_created_it(
    models: Path, local_rows: dict, tmp_path: Path
) -> None:
    """The pair's actor is the cluster's, not its creator's: a worker that started it stops (its handles
    closed and collected) and another worker's job still runs on the same warm actor."""
    settings, creator, _ = _ray_job(tmp_path, models, local_rows)
    pid = _actor_info(creator)["pid"]
    creator.store.dispose()
    creator.executor.close()
    del creator
    gc.collect()  # Ray ends an actor whose owning handles are gone, unless the cluster owns it
    other = Worker(settings)
    follow = _submit(other, models)
    assert _run(other, follow) == "ingesting"
    rows, job = _rows(settings, other, follow)
    _assert_same(rows["cells"], local_rows["cells"])
    assert job.provenance["executor"]["lost_chunks"] == 0 and _actor_info(other)["pid"] == pid
    other.store.dispose()


def _run_until_held(
    settings: Settings, worker: Worker, job_id: uuid.UUID
) -> tuple[threading.Thread, list[str]]:
    """Run the job in a thread until its actor holds chunk 00001; (the thread, its status once done)."""
    status: list[str] = []
    thread = threading.Thread(target=lambda: status.append(_run(worker, job_id)))
    thread.start()
    marker = parts_dir(settings.data_dir, job_id) / ".held-00001"
    deadline = time.monotonic() + BOUND  # bounds a broken actor only (a loaded machine starts Ray slowly)
    while not marker.exists():
        assert thread.is_alive() and time.monotonic() < deadline, "the actor never reached chunk 00001"
        time.sleep(0.05)
    return thread, status


def test_killed_actor_requeues_its_chunk_and_rows_land_once(
    models: Path, local_rows: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, models, "ray")
    worker = Worker(settings)
    job_id = _submit(worker, models)
    monkeypatch.setenv(HOLD_CHUNK_ENV, "00001")  # the actor blocks on the 2nd chunk until killed
    thread, status = _run_until_held(settings, worker, job_id)
    ray.kill(
        ray.get_actor(actor_name(replace(worker.pair_source(PAIR), device="cpu")), namespace=RAY_NAMESPACE)
    )
    thread.join()
    assert status == ["ingesting"]
    rows, job = _rows(settings, worker, job_id)
    _assert_same(rows["events"], local_rows["events"])  # each row once: 6 events, the same cells
    _assert_same(rows["cells"], local_rows["cells"])
    assert job.provenance["executor"]["lost_chunks"] == 1
    with worker.store.session(write=False) as s:
        logs = [m for (m,) in s.query(JobLog.message).filter(JobLog.job_id == job_id)]
    assert any("lost on chunk 00001" in m and "re-queued" in m for m in logs)
    assert _actor_info(worker)["chunks"] == 2  # the new actor ran the re-queued chunk and the last one
    worker.store.dispose()


def test_oom_in_the_actor_halves_the_batch_with_the_same_rows(
    models: Path, local_rows: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's OOM fault hook reaches the actor: each step redoes its chunk at batch 1, same rows."""
    monkeypatch.setenv(OOM_ABOVE_BATCH_ENV, "1")
    _, worker, job = _ray_job(tmp_path, models, local_rows)
    halvings = job.provenance["oom_halvings"]
    assert {h["batch_size"] for h in halvings} == {1}
    assert [h["stage"] for h in halvings].count("divergence") == 3  # one per chunk
    assert "crosspatch" in {h["stage"] for h in halvings}
    with worker.store.session(write=False) as s:
        logs = [m for (m,) in s.query(JobLog.message).filter(JobLog.job_id == job.id)]
    assert sum("out of memory" in m and "batch size 1" in m for m in logs) == len(halvings)
    worker.store.dispose()


def test_cancel_stops_the_actor_chunk_and_the_actor_stays_warm(
    models: Path, local_rows: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its actor holds chunk 00001: the job ends `cancelled` at the actor's next batch
    boundary (no kill), chunk 00001 writes nothing, and the same actor runs the next job."""
    settings = _settings(tmp_path, models, "ray")
    worker = Worker(settings)
    job_id = _submit(worker, models)
    monkeypatch.setenv(HOLD_CHUNK_ENV, "00001")  # the actor holds the 2nd chunk until cancelled
    thread, status = _run_until_held(settings, worker, job_id)
    before = _actor_info(worker)
    assert ops.cancel(worker.store, job_id)
    thread.join(timeout=BOUND)  # the same actor pid below shows it stopped by itself, not by a kill
    assert not thread.is_alive() and status == ["cancelled"]
    with worker.store.session(write=False) as s:
        parts = {p.name for p in s.query(JobPart).filter(JobPart.job_id == job_id)}
    assert parts == {"events.00000", "cells.00000"}  # nothing of the cancelled chunk
    after = _actor_info(worker)
    assert after["pid"] == before["pid"] and after["cancelled_chunks"] == before["cancelled_chunks"] + 1

    monkeypatch.delenv(HOLD_CHUNK_ENV)
    follow = _submit(worker, models)
    assert _run(worker, follow) == "ingesting"
    rows, _ = _rows(settings, worker, follow)
    _assert_same(rows["cells"], local_rows["cells"])
    assert _actor_info(worker)["pid"] == before["pid"]  # the warm actor ran it
    worker.store.dispose()
