"""Memory admission in the worker: staged under a small budget, refusal with the estimate, OOM halving."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crosspatch.app.config import Settings
from crosspatch.app.queue import ops
from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.models import Job, JobPart, Pair
from crosspatch.app.worker.context import OOM_ABOVE_BATCH_ENV
from crosspatch.app.worker.main import Worker
from crosspatch.app.worker.staging import workload_for
from crosspatch.engine.admission import Workload, estimate, read_shape
from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.pairs import load_pair
from crosspatch.engine.results import CELL_COLUMNS
from tests.app.builders import make_job, make_user
from tests.helpers import random_prompts, save_tiny_pair

PROMPTS = random_prompts(8, seed=4)


def _spec() -> dict:
    prompts = [{"id": p.id, "text": p.text, "category": p.category} for p in PROMPTS]
    return {
        "kind": "crosspatch",
        "pair_id": "tiny",
        "prompts": prompts,
        "max_new_tokens": 6,
        "batch_size": 4,
        "chunk_size": 8,
        "n_resamples": 20,
        "boundary": [2, 3],
    }


def _run(settings: Settings, **overrides) -> tuple[Job, pa.Table | None]:
    """Queue the crosspatch job on the saved tiny pair, run it in an in-process worker; (job, its cells)."""
    settings = settings.model_copy(update=overrides)
    upgrade(settings.database_url)
    pt, it = save_tiny_pair(settings.model_roots[0])
    worker = Worker(settings)
    with worker.store.session() as s:
        if s.get(Pair, "tiny") is None:
            s.add(
                Pair(pair_id="tiny", family="llama", pt=str(pt), it=str(it), n_layers=5, default_boundary=3)
            )
    owner = make_user(worker.store, f"ada{len(overrides)}{overrides.get('device_memory_gb')}")
    make_job(worker.store, owner, "tiny", spec=_spec())
    job_id = ops.claim(worker.store, worker.worker_id, lease_seconds=30.0)
    assert job_id is not None
    worker.run_one(job_id)
    with worker.store.session(write=False) as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        paths = [p.path for p in s.query(JobPart).filter_by(job_id=job_id) if p.table_name == "cells"]
    worker.store.dispose()
    cells = pa.concat_tables([pq.read_table(p) for p in paths]) if paths else None
    return job, cells


@pytest.fixture(scope="module")
def lockstep_cells(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """The job's cells computed in process, lockstep (the saved tiny pair is the same in every test)."""
    pt, it = save_tiny_pair(tmp_path_factory.mktemp("models"))
    pair = load_pair(pt, it, pair_id="tiny", family="llama")
    events = find_divergences(pair, PROMPTS, max_new_tokens=6, batch_size=4)
    return crosspatch(pair, events, boundary=[2, 3], batch_size=4)


def _max_diff(a: pa.Table, b: pa.Table) -> float:
    a = a.sort_by([("prompt_id", "ascending"), ("boundary", "ascending")])
    b = b.sort_by([("prompt_id", "ascending"), ("boundary", "ascending")])
    assert a.column("prompt_id").to_pylist() == b.column("prompt_id").to_pylist() and a.num_rows > 0
    return max(
        abs(x - y) for c in CELL_COLUMNS for x, y in zip(a[c].to_pylist(), b[c].to_pylist(), strict=True)
    )


def test_small_budget_runs_staged_then_refuses_below_one_model(settings: Settings, lockstep_cells) -> None:
    """Between the staged and lockstep estimates: staged, same cells; below staged: refused with the estimate."""
    shape = read_shape(save_tiny_pair(settings.model_roots[0])[0])
    w = workload_for(type("S", (), {"batch_size": 4, "max_new_tokens": 6})(), PROMPTS, [2, 3])
    est = estimate(shape, Workload(w.batch_size, w.prompt_tokens, w.new_tokens, 2, 4))
    assert est.staged < est.lockstep
    job, cells = _run(settings, device_memory_gb=(est.staged + est.lockstep) / 2 / 1e9)
    assert job.status == "ingesting", job.error
    memory = job.provenance["memory"]
    assert memory["mode"] == "staged" and memory["estimate_bytes"] == est.to_dict()
    assert memory["measured_peak_bytes"] > 0 and "staged" in memory["note"]
    assert job.provenance["models"]["pt_weights"] != "not loaded"
    assert job.provenance["noop_checks"]["tiny"]["cells"]["passed"]  # each model checked in its own phase
    assert cells is not None and _max_diff(cells, lockstep_cells) <= 1e-5

    job, _ = _run(settings, device_memory_gb=est.staged / 2 / 1e9)
    assert job.status == "failed"
    assert "even staged" in job.error and f"{est.staged / 1e6:.2f} MB staged" in job.error


def test_simulated_oom_halves_the_batch_and_finishes(settings: Settings, monkeypatch, lockstep_cells) -> None:
    """A batch above 2 'runs out of memory' mid-chunk: the chunk is redone at 2, the cells are the same."""
    monkeypatch.setenv(OOM_ABOVE_BATCH_ENV, "2")
    job, cells = _run(settings)
    assert job.status == "ingesting", job.error
    assert job.provenance["oom_halvings"] == [
        {"stage": "divergence", "batch_size": 2},
        {"stage": "crosspatch", "batch_size": 2},
    ]
    assert cells is not None and _max_diff(cells, lockstep_cells) <= 1e-5


def test_submit_refuses_a_job_that_cannot_fit_even_staged(settings: Settings) -> None:
    """The service knows the budget: 422 at submit with the estimate; within it, the job's memory is the estimate."""
    from crosspatch.app.errors import Invalid
    from crosspatch.app.schemas.jobs import JobCreate
    from crosspatch.app.services.jobs import validate_spec

    upgrade(settings.database_url)
    pt, it = save_tiny_pair(settings.model_roots[0])
    worker = Worker(settings)
    with worker.store.session() as s:
        s.add(Pair(pair_id="tiny", family="llama", pt=str(pt), it=str(it), n_layers=5, default_boundary=3))
    w = workload_for(type("S", (), {"batch_size": 4, "max_new_tokens": 6})(), PROMPTS, [2, 3])
    est = estimate(read_shape(pt), Workload(w.batch_size, w.prompt_tokens, w.new_tokens, 2, 4))
    with worker.store.session() as s:
        _, memory = validate_spec(s, settings, JobCreate.model_validate({"spec": _spec()}))
        assert memory == est.staged  # the queue's memory fit uses the staged peak of a stageable job
        small = settings.model_copy(update={"device_memory_gb": est.staged / 2 / 1e9})
        with pytest.raises(Invalid, match="even staged") as e:
            validate_spec(s, small, JobCreate.model_validate({"spec": _spec()}))
        assert e.value.status == 422 and f"{est.staged / 1e6:.2f} MB staged" in str(e.value)
    worker.store.dispose()


def test_submit_counts_closures_second_descendant_as_a_third_model(settings: Settings) -> None:
    """Closure with a second descendant: the estimate is lockstep + one model's weights (with overhead); a
    budget that fits two models but not three is a 422 naming the second descendant."""
    from crosspatch.app.errors import Invalid
    from crosspatch.app.schemas.jobs import JobCreate
    from crosspatch.app.services.jobs import validate_spec
    from crosspatch.engine.admission import OVERHEAD

    upgrade(settings.database_url)
    pt, it = save_tiny_pair(settings.model_roots[0])
    worker = Worker(settings)
    with worker.store.session() as s:
        s.add(Pair(pair_id="tiny", family="llama", pt=str(pt), it=str(it), n_layers=5, default_boundary=3))
    spec = _spec() | {"controls": ["closure"], "control_options": {"wrong_descendant": {"path": str(it)}}}
    w = workload_for(type("S", (), {"batch_size": 4, "max_new_tokens": 6})(), PROMPTS, [2, 3])
    est = estimate(read_shape(pt), Workload(w.batch_size, w.prompt_tokens, w.new_tokens, 2, 4))
    third = int(read_shape(pt).n_params * 4 * (1 + OVERHEAD))  # fp32 weights + overhead
    with worker.store.session() as s:
        _, memory = validate_spec(s, settings, JobCreate.model_validate({"spec": spec}))
        assert memory == est.lockstep + third  # controls never run staged: both models, plus the third
        two_not_three = settings.model_copy(update={"device_memory_gb": (est.lockstep + third / 2) / 1e9})
        with pytest.raises(Invalid, match="three models resident") as e:
            validate_spec(s, two_not_three, JobCreate.model_validate({"spec": spec}))
        assert e.value.status == 422 and str(e.value).startswith("spec.control_options.wrong_descendant:")
    worker.store.dispose()
