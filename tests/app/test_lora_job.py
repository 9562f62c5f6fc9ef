"""lora_control job: trains on trained_llama's PT, verifies, runs the 2x2; rows land in DuckDB."""

from __future__ import annotations

import random

import pytest

from crosspatch.app.config import Settings
from crosspatch.engine.organisms import organism_path
from crosspatch.engine.pairs import load_pair
from tests.app.builders import run_job_in_process

pytest.importorskip("peft")


def _corpus(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    nouns, colours = ("cat", "dog", "fox", "owl"), ("red", "blue", "green")
    return [f"the {r.choice(colours)} {r.choice(nouns)} sees the {r.choice(nouns)} ." for _ in range(n)]


@pytest.mark.parametrize(("lr", "steps", "status"), [(1e-3, 40, "valid"), (1e-5, 1, "not_valid")])
def test_lora_control_job(settings: Settings, lr: float, steps: int, status: str) -> None:
    root = organism_path("trained_llama")
    pair = load_pair(root / "pt", root / "it", pair_id="trained_llama")
    prompts = [{"id": f"d{i}", "text": " ".join(t.split()[:3])} for i, t in enumerate(_corpus(24, 2))]
    lora = dict(
        rank=4, alpha=8, lr=lr, seq_len=16, batch_size=8, train_tokens=16 * 8 * steps, checkpoint_every=10
    )
    spec = {"kind": "lora_control", "pair_id": pair.pair_id, "prompts": prompts, "n_resamples": 200}
    spec.update(corpus=_corpus(200, 0) + _corpus(40, 1), heldout_fraction=40 / 240, lora=lora)
    job, results = run_job_in_process(settings, pair, spec)
    (row,) = results.job_table("lora_controls", str(job.id), limit=10).to_pylist()
    assert row["status"] == status and row["pair_id"] == "trained_llama+lora" and row["steps"] == steps
    assert job.provenance["lora_control"]["status"] == status
    cells = results.job_table("cells", str(job.id), limit=1000)
    if status == "valid":
        assert row["nll_improvement"] >= 0.02 and row["merge_max_diff"] < 1e-4
        assert row["ci_low"] <= 0 <= row["ci_high"] and cells.num_rows == row["n_events"] > 0
    else:
        assert row["failed_checks"] == "domain_nll" and row["interaction"] is None and cells.num_rows == 0
