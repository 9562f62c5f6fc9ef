"""forced_tokens and continuation jobs: run by a worker on `forced_answer`, resumable, ingested into DuckDB."""

from __future__ import annotations

import json

import pytest

from crosspatch.app.config import Settings
from crosspatch.app.schemas.jobs import JOB_SPEC_ADAPTER
from crosspatch.app.services.plots import write_job_figures
from crosspatch.app.store.duckdb import ResultsStore
from crosspatch.app.store.models import Job
from crosspatch.engine.organisms.forced import forced_organism_path
from crosspatch.engine.pairs import load_pair
from tests.app.builders import run_job_in_process


def _inline_prompts() -> list[dict]:
    root = forced_organism_path()
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k in ("id", "category", "expected_answer", "answer_aliases")}
        | {"text": r["prompt"]}
        for r in rows
    ]


def _run(settings: Settings, spec: dict) -> tuple[Job, ResultsStore]:
    root = forced_organism_path()
    return run_job_in_process(settings, load_pair(root / "pt", root / "it", pair_id="forced_answer"), spec)


def test_forced_tokens_job(settings: Settings) -> None:
    spec = {"kind": "forced_tokens", "pair_id": "forced_answer", "prompts": _inline_prompts()}
    spec.update(max_new_tokens=4, batch_size=8, chunk_size=10, n_resamples=200)
    job, results = _run(settings, spec)
    rows = results.job_table("forced_tokens", str(job.id), limit=1000).to_pylist()
    assert len(rows) == 28 * 4
    assert {
        r["continuation_text"] for r in rows if r["prompt_id"] == "reason_00" and r["branch"] == "it"
    } == {"0 ."}
    summary = results.job_table("forced_summaries", str(job.id), limit=1000).to_pylist()
    got = {(r["level"], r["category"], r["statistic"], r["view"]): r for r in summary}
    reason = got[("pair", "CONTENT-REASON", "contrast", "suffix")]
    assert reason["mean"] == pytest.approx(0.75) and reason["ci_low"] > 0 and reason["n_events"] == 16
    assert got[("balanced", "CONTENT-FACT", "contrast", "suffix")]["mean"] == 0.0
    assert job.provenance["branches"] == ["it", "pt", "rank_matched", "class_matched"]
    figures = write_job_figures(results, settings.data_dir, job.id)
    assert "forced_contrasts.png" in {p.name for p in figures}


def test_continuation_job(settings: Settings) -> None:
    spec = {"kind": "continuation", "pair_id": "forced_answer", "prompts": _inline_prompts()}
    spec.update(max_new_tokens=4, batch_size=8, chunk_size=10, n_resamples=200, ns=[0, 1, 2])
    job, results = _run(settings, spec)
    rows = results.job_table("continuation", str(job.id), limit=10_000).to_pylist()
    # a bigram pair with identity blocks: upstream never matters, so every interaction is exactly 0
    assert rows and all(abs(r["interaction"]) < 1e-4 for r in rows)
    summary = results.job_table("continuation_summaries", str(job.id), limit=1000).to_pylist()
    n0 = next(r for r in summary if (r["variant"], r["n"], r["statistic"]) == ("native", 0, "interaction"))
    assert n0["n_events"] == 28
    assert job.provenance["ns"] == [0, 1, 2]
    figures = write_job_figures(results, settings.data_dir, job.id)
    assert "continuation_by_n.png" in {p.name for p in figures}


def test_specs_reject_bad_input() -> None:
    base = {"pair_id": "p", "prompts": [{"id": "a", "text": "t"}]}
    with pytest.raises(ValueError, match="include 'it' and 'pt'"):
        JOB_SPEC_ADAPTER.validate_python(
            {**base, "kind": "forced_tokens", "branches": ["it", "rank_matched"]}
        )
    with pytest.raises(ValueError, match="budget"):
        JOB_SPEC_ADAPTER.validate_python({**base, "kind": "forced_tokens", "budgets": {"SAFETY": 0}})
    with pytest.raises(ValueError, match="ns must be unique"):
        JOB_SPEC_ADAPTER.validate_python({**base, "kind": "continuation", "ns": [0, 0]})
