"""Chaos on PostgreSQL: >= 20 random kill -9 of workers and of the API (and two PostgreSQL crashes) while
jobs run; every job still succeeds without a manual retry, and DuckDB holds every row exactly once.

Each kill waits for an event, never the clock: a new checkpoint part recorded (or a job reaching a new
state) since the last kill, so every kill lands mid-work. All jobs run the same spec on the same prompts,
so their cells must be identical: a lost or duplicated row in any job shows as a difference.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import random_prompts, save_tiny_pair  # tests/helpers.py
from sqlalchemy import func, select

from crosspatch.app.config import Settings
from crosspatch.app.embedded import free_port
from crosspatch.app.main import settings_env
from crosspatch.app.store.models import Job, JobPart
from crosspatch.app.store.session import Store
from tests.app.live import bootstrap_users, start_worker
from tests.app.pg import PgServer

# slow; a hang shows as a failure with every thread's stack (pytest-timeout), not as a CI run past its limit
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

N_JOBS, N_PROMPTS, KILLS, N_WORKERS = 10, 8, 20, 2
PG_CRASHES_AT = (7, 14)  # after these kills, PostgreSQL itself crashes and restarts
BOUND = 600.0  # seconds; only a broken build waits this long for one event


class ApiDied(AssertionError):
    """The API process exited without being killed: a bug to show, not a restart to wait out."""


def _until(cond: Callable[[], Any], what: str, bound: float = BOUND) -> Any:
    t0 = time.monotonic()
    while True:
        try:
            value = cond()
        except ApiDied:
            raise
        except Exception:  # the API or PostgreSQL is restarting: ask again
            value = None
        if value:
            return value
        if time.monotonic() - t0 > bound:
            raise AssertionError(f"{what}: not within {bound} s")
        time.sleep(0.05)


class Api:
    """`crosspatch serve --no-worker` as a process that can be killed -9 and restarted on its port."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings, self.log, self.port = settings, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exits: list[str] = []  # exits the test did not cause, with the log's tail

    def start(self, wait: bool = True) -> None:
        """Start it; with `wait=False` the next kill may land while it is still starting (migrating)."""
        env = {**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1"}
        code = "from crosspatch.app.cli import main; main()"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, "serve", "--no-worker", "--port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if wait:
            _until(
                lambda: self.check_alive() and httpx.get(f"{self.url}/health", timeout=2).status_code == 200,
                "API up",
            )

    def check_alive(self) -> bool:
        """Restart the API, as a process manager would, when it exited by itself (e.g. it started while
        PostgreSQL was down: the migration fails and it exits); the third time, fail with its log."""
        if self.proc is None or (code := self.proc.poll()) is None:
            return True
        self.exits.append(f"exit {code}: " + self.log.read_text(errors="replace")[-2000:])
        if len(self.exits) > 2:
            raise ApiDied("the API exited by itself 3 times; its logs end:\n" + "\n---\n".join(self.exits))
        self.start(wait=False)
        return True

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def call(self, key: str, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request, retried while the API or PostgreSQL is down (connection errors, 5xx)."""

        def once() -> httpx.Response | None:
            self.check_alive()
            r = httpx.request(
                method, f"{self.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw
            )
            return r if r.status_code < 500 else None

        return _until(once, f"{method} {path}")


def _progress(store: Store) -> tuple[int, int]:
    """(parts recorded, jobs past running): grows with every piece of work done."""
    with store.session(write=False) as s:
        parts = s.scalar(select(func.count()).select_from(JobPart)) or 0
        done = s.scalar(
            select(func.count()).select_from(Job).where(Job.status.in_(("ingesting", "succeeded")))
        )
    return parts, done or 0


def test_jobs_survive_random_kills_of_workers_and_api(pg_server: PgServer, tmp_path: Path) -> None:
    models = tmp_path / "models"
    pt, it = save_tiny_pair(models)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=pg_server.create_database(),
        model_roots=[models],
        lease_seconds=2.0,
        heartbeat_seconds=0.3,
        poll_seconds=0.1,
        cancel_grace_seconds=2.0,
        _env_file=None,  # type: ignore[call-arg]
    )
    keys = bootstrap_users(settings, {"root": "admin", "ada": "researcher", "bob": "researcher"})
    api = Api(settings, tmp_path / "api.log")
    api.start()
    pair = {"pair_id": "tiny-llama", "family": "llama", "pt": str(pt), "it": str(it)}
    assert api.call(keys["root"], "POST", "/pairs", json=pair).status_code == 201
    prompts = [{"id": p.id, "text": p.text} for p in random_prompts(N_PROMPTS, seed=5)]
    spec = {"kind": "crosspatch", "pair_id": "tiny-llama", "prompts": prompts, "chunk_size": 1}
    spec |= {"max_new_tokens": 8, "n_resamples": 20, "boundary": [1, 2, 3]}
    owners = ["ada", "bob"] * (N_JOBS // 2)
    job_ids = [api.call(keys[o], "POST", "/jobs", json={"spec": spec}).json()["id"] for o in owners]
    store = Store(settings.database_url or "")
    workers = [start_worker(settings, tmp_path / f"worker{i}.log") for i in range(N_WORKERS)]
    rng = random.Random(18)
    kills: list[str] = []
    try:
        last = _until(lambda: _progress(store), "first progress")
        while len(kills) < KILLS:
            # the next kill lands after more work was done (a new part, a job further on)
            before = last
            last = _until(lambda b=before: (p := _progress(store)) != b and p, "progress since the last kill")
            if last[1] == N_JOBS:
                break
            if rng.random() < 0.25:
                api.kill()
                kills.append("api")
                api.start(wait=False)  # workers go on meanwhile; only ingest waits for the API
            else:
                i = rng.randrange(N_WORKERS)
                workers[i].send_signal(signal.SIGKILL)  # its supervisor: the worker child dies with it
                workers[i].wait()
                kills.append(f"worker{i}")
                workers[i] = start_worker(settings, tmp_path / f"worker{i}.log")
            if len(kills) in PG_CRASHES_AT:
                pg_server.restart()
        assert len(kills) >= KILLS, f"the jobs finished after only {len(kills)} kills: {kills}"

        def all_done() -> bool:
            states = [api.call(keys["ada"], "GET", f"/jobs/{j}/status").json()["status"] for j in job_ids]
            assert "failed" not in states and "cancelled" not in states, states
            return all(s == "succeeded" for s in states)

        _until(all_done, "every job succeeded")
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=60)
        if api.proc is not None and api.proc.poll() is None:
            api.proc.terminate()
            api.proc.wait(timeout=60)
        store.dispose()

    api.start()
    try:
        reference = None
        for job_id, owner in zip(job_ids, owners, strict=True):
            logs = [
                line["message"]
                for line in api.call(keys[owner], "GET", f"/jobs/{job_id}/logs").json()["data"]
            ]
            assert not any(m.startswith("retried by") for m in logs)  # no manual retry
            events = api.call(keys[owner], "GET", f"/jobs/{job_id}/results/events").json()["data"]
            assert sorted(e["prompt_id"] for e in events) == sorted(p["id"] for p in prompts)
            cells = api.call(keys[owner], "GET", f"/jobs/{job_id}/results/cells", params={"limit": 10_000})
            rows = sorted(
                (c["prompt_id"], c["boundary"], c["readout"], round(c["interaction"], 6))
                for c in cells.json()["data"]
            )
            assert len(rows) == len({r[:3] for r in rows}), "a duplicated cell"
            reference = reference or rows
            assert rows == reference, f"job {job_id} differs from the first job: a lost or extra row"
        assert len(reference or []) > 0
    finally:
        assert api.proc is not None
        api.proc.terminate()
        api.proc.wait(timeout=60)
