"""Workers that stop when told and die with their server: cancel, budgets, kill -9 of `serve --worker`.

Real processes on the tiny saved pair. A job "that does not look up" is the fault-injection hold
(`CROSSPATCH_FAULT_HOLD_AFTER_PARTS`): the worker blocks after its first part and checks nothing, as a
long forward would. Every wait is for an event (a marker file, a pid file, a process gone, a status) with
a bound that only catches a broken build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import BOUND, random_prompts, save_tiny_pair, wait_for_file  # tests/helpers.py

from crosspatch.app.config import Settings
from crosspatch.app.main import settings_env
from crosspatch.app.queue import ops
from crosspatch.app.store.migrate import upgrade
from crosspatch.app.store.models import Job, JobLog, JobPart, Pair
from crosspatch.app.store.session import Store
from crosspatch.app.worker.context import HELD_MARKER, HOLD_AFTER_PARTS_ENV, parts_dir
from crosspatch.app.worker.supervisor import device_lock_path
from tests.app.builders import make_user
from tests.app.live import start_worker

pytestmark = pytest.mark.slow

GRACE = 1.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_tiny_pair(root)
    return root


def _settings(tmp_path: Path, models: Path, **kw: object) -> Settings:
    fields: dict[str, object] = dict(
        data_dir=tmp_path / "data",
        model_roots=[models],
        lease_seconds=30.0,
        heartbeat_seconds=0.2,
        poll_seconds=0.1,
        cancel_grace_seconds=GRACE,
    )
    return Settings(**{**fields, **kw}, _env_file=None)  # type: ignore[arg-type]


@pytest.fixture
def store_for() -> Iterator[Callable[[Settings], Store]]:
    made: list[Store] = []

    def make(settings: Settings) -> Store:
        assert settings.database_url is not None
        upgrade(settings.database_url)
        made.append(Store.from_settings(settings))
        return made[-1]

    yield make
    for s in made:
        s.dispose()


def _job(store: Store, models: Path, n_prompts: int = 6, **spec_fields: object) -> uuid.UUID:
    owner = make_user(store, f"u{uuid.uuid4().hex[:6]}")
    with store.session() as s:
        if s.get(Pair, "tiny-llama") is None:
            s.add(
                Pair(
                    pair_id="tiny-llama",
                    family="llama",
                    pt=str(models / "pt"),
                    it=str(models / "it"),
                    n_layers=4,
                    default_boundary=2,
                )
            )
            s.flush()
        prompts = [{"id": p.id, "text": p.text} for p in random_prompts(n_prompts, seed=1)]
        spec = {"kind": "crosspatch", "pair_id": "tiny-llama", "prompts": prompts, "chunk_size": 1}
        spec |= {"max_new_tokens": 8, "n_resamples": 20, **spec_fields}
        job = Job(owner_id=owner, kind="crosspatch", spec=spec, status="queued", pair_id="tiny-llama")
        s.add(job)
        s.flush()
        return job.id


def _gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_until(cond: Callable[[], bool], what: str, bound: float = BOUND) -> float:
    """Seconds until `cond()` held (checked every 20 ms); fails past `bound`."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > bound:
            raise AssertionError(f"{what}: not within {bound} s")
        time.sleep(0.02)
    return time.monotonic() - t0


def _pids(settings: Settings) -> dict:
    path = device_lock_path(settings, "cpu").with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}


def _messages(store: Store, job_id: uuid.UUID) -> list[str]:
    with store.session(write=False) as s:
        return [m for (m,) in s.query(JobLog.message).filter(JobLog.job_id == job_id)]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=BOUND)


def test_cancel_stops_a_job_that_does_not_look_up_within_seconds(
    tmp_path: Path, models: Path, store_for: Callable[[Settings], Store]
) -> None:
    settings = _settings(tmp_path, models)
    store = store_for(settings)
    job = _job(store, models)
    proc = start_worker(settings, tmp_path / "worker.log", {HOLD_AFTER_PARTS_ENV: "1"})
    try:
        wait_for_file(parts_dir(settings.data_dir, job) / HELD_MARKER, proc, timeout=BOUND)
        stuck = _pids(settings)["worker"]
        assert ops.cancel(store, job)
        took = _wait_until(lambda: _gone(stuck), "the stuck worker killed")
        # the supervisor notes the stop at its next tick and kills only after the grace period: a lower
        # bound only (load can delay the kill, never hasten it; half: the tick's clock may precede our t0)
        assert took >= GRACE / 2, took
        assert ops.status_of(store, job) == "cancelled"
        # the supervisor records why, right after the kill
        _wait_until(
            lambda: any("killed by its supervisor" in m for m in _messages(store, job)), "the log line"
        )
        _wait_until(lambda: _pids(settings).get("worker") not in (None, stuck), "a fresh worker")
        assert not _gone(_pids(settings)["worker"]) and proc.poll() is None
    finally:
        _stop(proc)


def test_cancel_stops_at_the_next_batch_without_a_kill(
    tmp_path: Path, models: Path, store_for: Callable[[Settings], Store]
) -> None:
    """A cancelled job stops at its next batch (mid-chunk, no part written); the same worker goes on."""
    settings = _settings(tmp_path, models, cancel_grace_seconds=300.0)  # the supervisor would wait
    store = store_for(settings)
    # one chunk of 200 prompts in batches of 1: a cancel must land inside the chunk
    big = _job(store, models, n_prompts=200, chunk_size=10_000, batch_size=1, max_new_tokens=16)
    small = _job(store, models)
    proc = start_worker(settings, tmp_path / "worker.log")
    try:

        def batches_done() -> int:
            with store.session(write=False) as s:
                job = s.get(Job, big)
                assert job is not None
                return job.progress.get("batch", [0])[0] if job.status == "running" else 0

        _wait_until(lambda: batches_done() >= 2, "the big job inside its chunk")
        worker = _pids(settings)["worker"]
        assert ops.cancel(store, big)
        _wait_until(lambda: ops.status_of(store, small) != "queued", "the next job claimed")
        # seen by the next heartbeat, raised at the next batch: had it not stopped by itself, the supervisor
        # would have killed it after the 300 s grace, and the same worker would not be claiming
        assert _pids(settings)["worker"] == worker and not _gone(worker)  # stopped by itself, not killed
        assert not any("killed by its supervisor" in m for m in _messages(store, big))
        with store.session(write=False) as s:
            assert s.query(JobPart).filter(JobPart.job_id == big).count() == 0  # stopped mid-chunk
        assert batches_done() < 200
    finally:
        _stop(proc)


def test_wall_clock_budget_fails_the_job_with_the_reason(
    tmp_path: Path, models: Path, store_for: Callable[[Settings], Store]
) -> None:
    settings = _settings(tmp_path, models, job_time_limit_seconds={"crosspatch": 1.0})
    store = store_for(settings)
    job = _job(store, models)
    proc = start_worker(settings, tmp_path / "worker.log", {HOLD_AFTER_PARTS_ENV: "1"})
    try:
        _wait_until(lambda: ops.status_of(store, job) == "failed", "the job failed")
        with store.session(write=False) as s:
            error = s.get(Job, job).error  # type: ignore[union-attr]
        assert "exceeded its wall-clock budget of 1 s for crosspatch jobs" in (error or ""), error
    finally:
        _stop(proc)


def test_memory_budget_fails_the_job_with_the_reason(
    tmp_path: Path, models: Path, store_for: Callable[[Settings], Store]
) -> None:
    settings = _settings(tmp_path, models, job_memory_bytes=1 << 20)  # any Python process is above 1 MiB
    store = store_for(settings)
    job = _job(store, models)
    proc = start_worker(settings, tmp_path / "worker.log")
    try:
        _wait_until(lambda: ops.status_of(store, job) == "failed", "the job failed")
        with store.session(write=False) as s:
            error = s.get(Job, job).error  # type: ignore[union-attr]
        assert "exceeded its memory budget" in (error or "") and "> 1 MiB" in (error or ""), error
    finally:
        _stop(proc)


def _serve(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """`crosspatch serve --worker` as a real process."""
    from crosspatch.app.embedded import free_port

    env = {**os.environ, **settings_env(settings)}
    code = "from crosspatch.app.cli import main; main()"
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--worker", "--port", str(free_port())],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_embedded_worker_dies_with_its_server_and_is_never_doubled(tmp_path: Path, models: Path) -> None:
    locks = tmp_path / "locks"  # one host-wide lock directory, as for two deployments on one GPU host
    settings = _settings(tmp_path, models, worker_lock_dir=locks)
    log = tmp_path / "serve.log"
    first = _serve(settings, log)
    try:
        _wait_until(lambda: bool(_pids(settings)), "the first server's worker started")
        pids = _pids(settings)
        # a second server on the same device refuses to start while the first one's worker lives
        other = _settings(tmp_path / "other", models, worker_lock_dir=locks)
        second = _serve(other, tmp_path / "second.log")
        assert second.wait(timeout=BOUND) != 0
        assert "already alive" in (tmp_path / "second.log").read_text()
        assert not _gone(pids["supervisor"]) and not _gone(pids["worker"])
        first.send_signal(signal.SIGKILL)
        first.wait()
        _wait_until(lambda: _gone(pids["supervisor"]) and _gone(pids["worker"]), "the orphans gone")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    third = _serve(settings, tmp_path / "third.log")  # the device is free again
    try:
        _wait_until(lambda: _pids(settings).get("supervisor") not in (None, pids["supervisor"]), "restart")
        again = _pids(settings)
        third.send_signal(signal.SIGTERM)  # a clean shutdown leaves nothing behind either
        # (uvicorn shuts down gracefully, then re-raises the signal it caught: exit status -15)
        assert third.wait(timeout=BOUND) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in (tmp_path / "third.log").read_text()
        assert _gone(again["supervisor"]) and _gone(again["worker"])
    finally:
        if third.poll() is None:
            third.kill()
            third.wait()
