"""Residuals in the shared cache: a second researcher's identical crosspatch job reuses the first's chunk
residuals (no divergence decode: only the off-diagonal late stacks and the first batch's no-op check run,
counted as forward calls), with the same rows in DuckDB; a private job's residuals are not reused for
another researcher; past the size cap the least recently used chunk entries go."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from crosspatch.app.config import Settings
from crosspatch.app.queue import ops
from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.models import CacheEntry, Job, Pair
from crosspatch.app.worker.main import Worker
from tests.app.builders import make_job, make_user
from tests.app.live import client, live_service, live_settings
from tests.helpers import BOUND, cli_ok, random_prompts, save_tiny_pair

L, BOUNDARIES, BATCH, CHUNK = 5, [2, 3], 4, 4
PROMPTS = [{"id": p.id, "text": p.text, "category": p.category} for p in random_prompts(8, seed=4)]


def _spec(max_new_tokens: int = 6) -> dict[str, Any]:
    return {
        "kind": "crosspatch",
        "pair_id": "tiny",
        "prompts": PROMPTS,
        "max_new_tokens": max_new_tokens,
        "batch_size": BATCH,
        "chunk_size": CHUNK,
        "n_resamples": 20,
        "boundary": BOUNDARIES,
    }


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, str]]]:
    root = tmp_path_factory.mktemp("residuals")
    pt, it = save_tiny_pair(root / "models")
    settings = live_settings(root, [root / "models"], poll_seconds=0.2, heartbeat_seconds=0.5)
    users = {"root": "admin", "ada": "researcher", "bob": "researcher", "carol": "researcher"}
    with live_service(settings, users, {"tiny": ("llama", pt, it)}, root / "worker.log") as (server, keys):
        yield server, keys


def _run(c: httpx.Client, spec: dict[str, Any], share: str = "lab") -> str:
    r = c.post("/jobs", json={"spec": spec, "share": share})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    with c.stream(
        "GET", f"/jobs/{job_id}/progress", timeout=BOUND
    ) as stream:  # event-driven: ends with the job
        events = [line for line in stream.iter_lines() if line.startswith("event:")]
    assert events[-1] == "event: end", events
    job = c.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", (job, c.get(f"/jobs/{job_id}/logs").json())
    return job_id


def _rows(c: httpx.Client, job_id: str, table: str) -> list[dict[str, Any]]:
    r = c.get(f"/jobs/{job_id}/results/{table}", params={"limit": 10_000})
    assert r.status_code == 200, r.text
    rows = [{k: v for k, v in row.items() if k != "job_id"} for row in r.json()["data"]]
    return sorted(rows, key=lambda r: tuple(str(r.get(k)) for k in ("prompt_id", "boundary", "readout")))


def _provenance(c: httpx.Client, job_id: str) -> dict[str, Any]:
    r = c.get(f"/jobs/{job_id}/provenance")
    assert r.status_code == 200, r.text
    return r.json()["provenance"]


def _late_stack_blocks(events: list[dict[str, Any]]) -> int:
    """Block forwards per model of a job whose residuals all came from the cache (a hand count).

    Per batch of diverged events and boundary b: one off-diagonal late stack of L - b blocks. The first
    batch's no-op check adds one HF forward (L blocks) and a self-patch late stack per boundary.
    """
    per_stack = sum(L - b for b in BOUNDARIES)
    by_prompt = {e["prompt_id"]: e["diverged"] for e in events}
    diverged = [
        sum(by_prompt[p["id"]] for p in PROMPTS[i : i + CHUNK]) for i in range(0, len(PROMPTS), CHUNK)
    ]
    batches = sum(math.ceil(n / BATCH) for n in diverged)
    return L + per_stack + batches * per_stack


def test_second_researcher_reuses_the_first_ones_residuals(
    service: tuple[Any, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    server, keys = service
    with client(server, keys["ada"]) as ada, client(server, keys["bob"]) as bob:
        first = _run(ada, _spec())
        second = _run(bob, _spec())
        rows = {job: {t: _rows(bob, job, t) for t in ("events", "cells")} for job in (first, second)}
        p1, p2 = _provenance(ada, first), _provenance(bob, second)
        listed = bob.get("/cache").json()
    assert rows[first]["cells"] and rows[second] == rows[first]  # same rows, exactly (job id aside)

    miss, hit = p1["shared_cache"]["residuals"], p2["shared_cache"]["residuals"]
    assert miss["hit"] is False and sorted(miss["chunks"]) == ["00000", "00001"]
    assert hit["key"] == miss["key"] and hit["hit"] is True
    for name, chunk in hit["chunks"].items():
        assert chunk["key"] == miss["chunks"][name]["key"] and chunk["from_job"] == first

    # less compute, counted: no decode at all (the only model calls are the no-op check's HF forwards)
    events = rows[first]["events"]
    assert any(e["diverged"] for e in events)
    assert p2["compute"]["model"] == {"pt": 1, "it": 1}
    blocks = _late_stack_blocks(events)
    assert p2["compute"]["blocks"] == {"pt": blocks, "it": blocks}
    for r in ("pt", "it"):  # the first job did the same plus the decode: a prefill per chunk and the steps
        decode = p1["compute"]["model"][r] - 1
        assert decode >= len(PROMPTS) // CHUNK
        assert p1["compute"]["blocks"][r] == blocks + L * decode

    keys_listed = {e["key"] for e in listed["data"] if e["kind"] == "residuals"}
    assert keys_listed == {c["key"] for c in miss["chunks"].values()}
    out = cli_ok(capsys, "cache", "ls", "--url", server.url, "--key", keys["bob"])
    assert out.count("residuals") == 2


def test_private_residuals_are_not_reused_for_another_researcher(service: tuple[Any, dict[str, str]]) -> None:
    server, keys = service
    with client(server, keys["ada"]) as ada, client(server, keys["carol"]) as carol:
        private = _run(ada, _spec(max_new_tokens=5), share="owner")
        theirs = _run(carol, _spec(max_new_tokens=5))
        p1, p2 = _provenance(ada, private), _provenance(carol, theirs)
        listed = {e["key"] for e in carol.get("/cache").json()["data"]}
    assert p1["shared_cache"]["residuals"]["key"] == p2["shared_cache"]["residuals"]["key"]
    assert p2["shared_cache"]["residuals"]["hit"] is False  # computed again, stored for carol
    assert not any(c["hit"] for c in p2["shared_cache"]["residuals"]["chunks"].values())
    assert p2["compute"]["model"] == p1["compute"]["model"]  # the full decode ran again
    assert not {c["key"] for c in p1["shared_cache"]["residuals"]["chunks"].values()} - listed  # carol's own


def test_residual_entries_past_the_cap_evict_lru(settings: Settings) -> None:
    """With room for one chunk's entry, each job keeps only its last chunk's; a rerun misses the evicted one."""
    upgrade(settings.database_url)
    pt, it = save_tiny_pair(settings.model_roots[0])
    worker = Worker(settings)
    with worker.store.session() as s:
        s.add(Pair(pair_id="tiny", family="llama", pt=str(pt), it=str(it), n_layers=L, default_boundary=3))
    owner = make_user(worker.store, "ada")

    def run(spec: dict[str, Any]) -> dict[str, Any]:
        job_id = make_job(worker.store, owner, "tiny", spec=spec)
        assert ops.claim(worker.store, worker.worker_id, lease_seconds=30.0) == job_id
        assert worker.run_one(job_id) == "ingesting"
        with worker.store.session(write=False) as s:
            return s.get(Job, job_id).provenance["shared_cache"]["residuals"]

    first = run(_spec())
    sizes = [c["stored_bytes"] for c in first["chunks"].values()]
    worker.shared_cache.cap_bytes = int(1.5 * max(sizes))  # room for one entry
    other = run(_spec(max_new_tokens=5))  # two new entries: each store trims to the cap
    with worker.store.session(write=False) as s:
        entries = s.query(CacheEntry).all()
        assert [e.key for e in entries] == [other["chunks"]["00001"]["key"]]
        assert sum(e.size_bytes for e in entries) <= worker.shared_cache.cap_bytes
    assert [p.name for p in (settings.data_dir / "shared_cache").iterdir()] == [Path(entries[0].path).name]
    worker.shared_cache.cap_bytes = 1 << 30
    again = run(_spec(max_new_tokens=5))  # the evicted chunk is decoded again, the kept one reused
    assert [again["chunks"][n]["hit"] for n in ("00000", "00001")] == [False, True]
    worker.store.dispose()


def test_saved_residuals_give_the_same_cells_bit_for_bit(tmp_path: Path) -> None:
    """Events and captures round-trip through the entry's files; events past the capture budget keep none
    (scored unfused, as in the job that computed them), and the cells are identical."""
    from crosspatch.app.worker import residual_cache
    from crosspatch.engine.crosspatch import crosspatch
    from crosspatch.engine.divergence import iter_divergences
    from tests.helpers import tiny_pair

    pair = tiny_pair("llama", seed=3, it_scale=0.05)
    prompts = random_prompts(8, seed=4)

    def decode() -> list:
        batches = iter_divergences(pair, prompts, 6, 4, capture=BOUNDARIES, max_capture_bytes=3 * 2**14)
        return [e for b in batches for e in b]

    events = decode()
    captured = [e for e in events if e.capture is not None]
    assert captured and len(captured) < sum(e.diverged for e in events)  # the budget left some out
    residual_cache.save(events, tmp_path)
    loaded = residual_cache.load(tmp_path)
    for a, b in zip(events, loaded, strict=True):
        assert {k: v for k, v in vars(a).items() if k != "capture"} == {
            k: v for k, v in vars(b).items() if k != "capture"
        }
        assert (a.capture is None) == (b.capture is None)
        if a.capture is not None:
            for role in ("pt", "it"):
                assert torch.equal(a.capture.final[role], b.capture.final[role])
                assert all(
                    torch.equal(a.capture.inputs[role][k], b.capture.inputs[role][k]) for k in BOUNDARIES
                )
    want = crosspatch(pair, events, boundary=BOUNDARIES, readouts=("it", "pt"), batch_size=BATCH)
    got = crosspatch(pair, loaded, boundary=BOUNDARIES, readouts=("it", "pt"), batch_size=BATCH)
    assert got.equals(want)
