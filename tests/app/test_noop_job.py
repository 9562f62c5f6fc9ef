"""A crosspatch job runs the runtime no-op check on its first batch: recorded in provenance, fatal when broken."""

from __future__ import annotations

import torch

from crosspatch.app.config import Settings
from crosspatch.app.queue import ops
from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.models import Job
from crosspatch.app.worker.main import Worker
from tests.app.builders import make_job, make_pair, make_user
from tests.helpers import random_prompts, tiny_pair


def _run(settings: Settings, pair) -> Job:
    """Queue one crosspatch job on `pair` (held warm by an in-process worker) and run it."""
    upgrade(settings.database_url)
    worker = Worker(settings)
    worker._pair, worker._pair_id = pair, pair.pair_id  # the worker's warm pair: no model loading
    owner = make_user(worker.store, "ada")
    make_pair(worker.store, pair.pair_id)
    prompts = [{"id": p.id, "text": p.text, "category": p.category} for p in random_prompts(10, seed=4)]
    spec = {"kind": "crosspatch", "pair_id": pair.pair_id, "prompts": prompts, "max_new_tokens": 6}
    spec.update(batch_size=4, chunk_size=5, n_resamples=20)
    make_job(worker.store, owner, pair.pair_id, spec=spec)
    job_id = ops.claim(worker.store, worker.worker_id, lease_seconds=30.0, loaded_pair=pair.pair_id)
    assert job_id is not None
    worker.run_one(job_id)
    with worker.store.session(write=False) as s:
        job = s.get(Job, job_id)
        s.expunge(job)
    worker.store.dispose()
    return job


def test_job_records_its_noop_check(settings: Settings) -> None:
    job = _run(settings, tiny_pair("llama", it_scale=0.05, seed=3))
    assert job.status == "ingesting", job.error
    check = job.provenance["noop_checks"]["tiny-llama"]["cells"]
    assert check["passed"] and check["tolerance"] == 1e-4 and check["dtype"] == "float32"
    assert set(check["max_abs_diff"]) == {
        "pt_diagonal_vs_hf",
        "it_diagonal_vs_hf",
        "pt_self_patch",
        "it_self_patch",
    }
    assert max(check["max_abs_diff"].values()) <= 1e-4


def test_job_with_a_broken_late_stack_fails_with_the_noop_reason(settings: Settings) -> None:
    pair = tiny_pair("llama", it_scale=0.05, seed=3)
    blocks = pair.pt_adapter.blocks
    pair.pt_adapter.blocks = torch.nn.ModuleList([*blocks[:-2], blocks[-1], blocks[-2]])  # tampered
    job = _run(settings, pair)
    assert job.status == "failed"
    # the job's 2x2 is fused: its diagonal cells are the decoding pass's own HF forward, so the tampered
    # explicit late stack shows in the self-patch check (late stack from PT's own captured residual)
    assert job.error.startswith("runtime no-op check failed") and "pt_self_patch" in job.error
