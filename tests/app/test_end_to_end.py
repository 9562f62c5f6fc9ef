"""End to end: real uvicorn server, real worker processes, a crosspatch job on a tiny saved pair.

The numbers the API returns equal the library's for the same inputs; a worker killed with SIGKILL
mid-job loses nothing (a new worker resumes from the finished parts, and DuckDB holds each row once).
"""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BOUND, save_tiny_pair, wait_for_file  # tests/helpers.py

from crosspatch.app.config import Settings
from crosspatch.app.store.layout import parts_dir
from crosspatch.app.worker.context import HELD_MARKER, HOLD_AFTER_PARTS_ENV
from crosspatch.engine.organisms.tiny import tiny_sweep_spec
from tests.app.live import client, finished_job, live_service, live_settings, start_worker

pytestmark = pytest.mark.slow

N_PROMPTS = 8


def _prompts() -> list[dict]:
    from helpers import random_prompts

    return [{"id": p.id, "text": p.text, "category": p.category} for p in random_prompts(N_PROMPTS, seed=3)]


SPEC = tiny_sweep_spec(chunk_size=1, n_resamples=50)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("e2e")
    models = root / "models"
    pt, it = save_tiny_pair(models)
    settings = live_settings(root, [models], lease_seconds=3.0, heartbeat_seconds=0.5, poll_seconds=0.2)
    users = {"root": "admin", "ada": "researcher"}
    with live_service(settings, users, {"tiny-llama": ("llama", pt, it)}) as (server, keys):
        yield {"server": server, "keys": keys, "settings": settings, "pt": pt, "it": it, "root": root}


@pytest.fixture(scope="module")
def library_cells(env: dict) -> list[dict]:
    """The same job run in-process through the library, chunk by chunk as the worker runs it."""
    from crosspatch.engine.crosspatch import crosspatch
    from crosspatch.engine.divergence import iter_divergences
    from crosspatch.engine.pairs import load_pair
    from crosspatch.engine.prompts import PromptRecord

    pair = load_pair(env["pt"], env["it"], family="llama", pair_id="tiny-llama")
    prompts = [PromptRecord(**p) for p in _prompts()]
    rows: list[dict] = []
    for i in range(0, len(prompts), SPEC["chunk_size"]):
        chunk = prompts[i : i + SPEC["chunk_size"]]
        events = [  # as the worker: decoding keeps the boundary inputs, the 2x2 runs fused
            e
            for batch in iter_divergences(
                pair,
                chunk,
                max_new_tokens=SPEC["max_new_tokens"],
                batch_size=SPEC["batch_size"],
                capture=pair.resolve_boundaries("sweep"),
            )
            for e in batch
        ]
        table = crosspatch(
            pair, events, boundary="sweep", readouts=("it", "pt"), batch_size=SPEC["batch_size"]
        )
        rows += table.to_pylist()
    assert rows
    return rows


def _key(row: dict) -> tuple:
    return (row["prompt_id"], row["boundary"], row["readout"])


def _assert_same_cells(api_rows: list[dict], lib_rows: list[dict]) -> None:
    assert len(api_rows) == len({_key(r) for r in api_rows}), "duplicate rows"
    lib = {_key(r): r for r in lib_rows}
    assert {_key(r) for r in api_rows} == set(lib)
    for row in api_rows:
        ref = lib[_key(row)]
        for col, value in ref.items():
            if isinstance(value, float):
                assert row[col] == pytest.approx(value, rel=1e-9, abs=1e-9), (col, row, ref)
            else:
                assert row[col] == value, (col, row, ref)


def _parts(settings: Settings, job_id: str) -> int:
    db = str(settings.database_url).removeprefix("sqlite:///")
    with sqlite3.connect(db, timeout=10) as con:
        return con.execute(
            "SELECT count(*) FROM job_parts WHERE job_id = ?", [job_id.replace("-", "")]
        ).fetchone()[0]


def test_crosspatch_job_end_to_end(env: dict, library_cells: list[dict], tmp_path: Path) -> None:
    worker = start_worker(env["settings"], tmp_path / "worker.log")
    try:
        with client(env["server"], env["keys"]["ada"]) as c:
            r = c.post("/jobs", json={"spec": {**SPEC, "prompts": _prompts()}})
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            with c.stream("GET", f"/jobs/{job_id}/progress", timeout=BOUND) as stream:
                events = [line for line in stream.iter_lines() if line.startswith("event:")]
            assert events[-1] == "event: end" and "event: progress" in events
            job = finished_job(c, job_id)
            assert job["status"] == "succeeded", (job, (tmp_path / "worker.log").read_text()[-3000:])
            cells = c.get(f"/jobs/{job_id}/results/cells").json()
            _assert_same_cells(cells["data"], library_cells)
            summaries = c.get(f"/jobs/{job_id}/results/summaries").json()
            assert summaries["count"] > 0 and {"estimate", "ci_low", "ci_high", "p_value"} <= set(
                summaries["data"][0]
            )
            parquet = c.get(f"/jobs/{job_id}/results/cells", params={"format": "parquet"})
            assert parquet.status_code == 200 and parquet.content[:4] == b"PAR1"
            prov = c.get(f"/jobs/{job_id}/provenance").json()
            assert prov["provenance"]["models"]["tokenizer"] and prov["provenance"]["versions"]["torch"]
            assert prov["spec"]["boundary"] == "sweep"
            # A rerun (retry is refused on success; delete + resubmit would be new): re-ingest the same job.
            assert c.post(f"/jobs/{job_id}/retry").status_code == 409
    finally:
        worker.terminate()
        worker.wait(timeout=BOUND)


def test_killed_worker_loses_nothing(env: dict, library_cells: list[dict], tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    with client(env["server"], env["keys"]["ada"]) as c:
        # the first worker holds (blocks) once the job has 2 parts and says so in a marker file: the kill
        # lands at a known point, with no polling race against a fast worker
        first = start_worker(env["settings"], log, {HOLD_AFTER_PARTS_ENV: "2"})
        job_id = c.post("/jobs", json={"spec": {**SPEC, "prompts": _prompts()}}).json()["id"]
        marker = parts_dir(env["settings"].data_dir, job_id) / HELD_MARKER
        wait_for_file(marker, first)
        first.send_signal(signal.SIGKILL)
        first.wait()
        done_before = _parts(env["settings"], job_id)
        assert c.get(f"/jobs/{job_id}").json()["status"] == "running"
        second = start_worker(env["settings"], log)
        try:
            job = finished_job(c, job_id)
        finally:
            second.terminate()
            second.wait(timeout=BOUND)
        assert job["status"] == "succeeded", (job, log.read_text()[-3000:])
        assert job["attempts"] == 2
        messages = [line["message"] for line in c.get(f"/jobs/{job_id}/logs").json()["data"]]
        assert any("re-queued" in m for m in messages), messages
        assert any(m.startswith("resumed: skipped") for m in messages), messages
        assert done_before == int(marker.read_text()) >= 2  # the parts the worker held with, all kept
        cells = c.get(f"/jobs/{job_id}/results/cells").json()
        _assert_same_cells(cells["data"], library_cells)
        events = c.get(f"/jobs/{job_id}/results/events").json()
        assert events["count"] == N_PROMPTS and len({e["prompt_id"] for e in events["data"]}) == N_PROMPTS
