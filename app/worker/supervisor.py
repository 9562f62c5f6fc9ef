"""The worker's supervisor: one parent process that runs the real worker as a child and replaces it.

Why: a job's code may not look up for minutes (one long forward, a huge batch), so a cancelled or
over-budget job cannot be trusted to stop itself. The supervisor watches what its child runs (the child
reports `job <id> <kind>` / `idle` lines on a pipe) and, from the job store, whether that job should
stop. Past `cancel_grace_seconds` it SIGKILLs the child, fails the job with the reason when the cause was
a budget (wall clock per kind, resident memory), and starts a fresh child.

Lifetimes: each process asks the kernel to signal it when its parent dies (PR_SET_PDEATHSIG): the child
gets SIGKILL when the supervisor dies, the supervisor SIGTERM when the server that started it dies (then
it stops its child and exits). An embedded server also holds a per-device lock (`DeviceLock`, flock on a
file, inherited by supervisor and child), so a second server on the same device refuses to start a worker
while any process of the first one is alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy import select as sql_select

from crosspatch.app.config import Settings
from crosspatch.app.queue import ops
from crosspatch.app.store.models import Job, JobLog
from crosspatch.app.store.session import Store

log = logging.getLogger(__name__)

PARENT_PID_ENV = "CROSSPATCH_PARENT_PID"
STATUS_FD_ENV = "CROSSPATCH_WORKER_STATUS_FD"
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """Ask the kernel to send `sig` when the process that started us dies; exit now if it already did.

    The parent's pid comes from `PARENT_PID_ENV` (set by whoever spawned us); checking it after the
    prctl closes the race where the parent died before the request was made.
    """
    expected = os.environ.get(PARENT_PID_ENV)
    if expected is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != int(expected):
        log.error("parent %s is gone; exiting", expected)
        os._exit(3)


def resident_bytes(pid: int) -> int:
    """Resident memory of process `pid` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def budget_reason(settings: Settings, kind: str, elapsed: float, rss: int) -> str | None:
    """Why a job past its budget must stop ("exceeded ..."), or None while it is within it."""
    limit = settings.job_time_limit_seconds.get(kind)
    if limit is not None and elapsed > limit:
        return f"exceeded its wall-clock budget of {limit:g} s for {kind} jobs (CROSSPATCH_JOB_TIME_LIMIT_SECONDS)"
    if settings.job_memory_bytes is not None and rss > settings.job_memory_bytes:
        return (
            f"exceeded its memory budget: {rss / 2**20:.0f} MiB resident > "
            f"{settings.job_memory_bytes / 2**20:.0f} MiB (CROSSPATCH_JOB_MEMORY_BYTES)"
        )
    return None


# ---- the per-device lock ---------------------------------------------------------------------------
def device_lock_path(settings: Settings, device: str) -> Path:
    """The lock file of `device` (under `settings.worker_lock_dir`, default data_dir/workers)."""
    root = settings.worker_lock_dir or settings.data_dir / "workers"
    return Path(root) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.lock"


class DeviceBusy(RuntimeError):
    """Another worker process holds the device's lock."""


class DeviceLock:
    """An exclusive flock on the device's lock file; every process that inherits the fd keeps it held."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, settings: Settings, device: str, wait_seconds: float = 0.0) -> DeviceLock:
        """Take the lock, retrying for up to `wait_seconds` (a dying orphan may still be stopping)."""
        path = device_lock_path(settings, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise DeviceBusy(
                        f"a worker on device {device!r} is already alive ({holder or 'unknown pid'}; lock "
                        f"{path}); stop it before starting another server with an embedded worker"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"server pid {os.getpid()}".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Drop this process's hold (children that inherited the fd keep it until they exit)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


# ---- the supervisor --------------------------------------------------------------------------------
@dataclass
class _Running:
    job_id: uuid.UUID
    kind: str
    since: float
    stop_since: float | None = None
    budget: str | None = None


class Supervisor:
    """Runs `python -m crosspatch.app.worker --child` and replaces it when it must not go on."""

    def __init__(
        self,
        settings: Settings,
        device: str,
        *,
        max_jobs: int | None = None,
        exit_when_idle: bool = False,
        lock_fd: int | None = None,
    ) -> None:
        self.settings, self.device = settings, device
        self.max_jobs, self.exit_when_idle, self.lock_fd = max_jobs, exit_when_idle, lock_fd
        self.store = Store.from_settings(settings)
        self.stopping = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None
        self.child_id = ""
        self.running: _Running | None = None
        self.replaced = 0
        self._buf = b""
        self._read_fd = -1
        self._eof = False

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop the child gracefully (it hands its job back), then exit."""

        def on_signal(signum: int, _frame: Any) -> None:
            self.stopping.set()
            if self.child is not None and self.child.poll() is None:
                self.child.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # ---- children ------------------------------------------------------------------------------
    def _spawn(self) -> None:
        read_fd, write_fd = os.pipe()
        self.child_id = f"{socket.gethostname()}:{os.getpid()}:{self.device}:{uuid.uuid4().hex[:6]}"
        cmd = [sys.executable, "-m", "crosspatch.app.worker", "--child", "--device", self.device]
        cmd += ["--worker-id", self.child_id]
        if self.max_jobs is not None:
            cmd += ["--max-jobs", str(self.max_jobs)]
        if self.exit_when_idle:
            cmd.append("--exit-when-idle")
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid()), STATUS_FD_ENV: str(write_fd)}
        fds = (write_fd,) if self.lock_fd is None else (write_fd, self.lock_fd)
        self.child = subprocess.Popen(cmd, env=env, pass_fds=fds)
        os.close(write_fd)
        if self._read_fd >= 0:
            os.close(self._read_fd)
        self._read_fd, self._buf, self._eof, self.running = read_fd, b"", False, None
        self._write_pids()
        log.info("supervisor %d: worker %s is pid %d", os.getpid(), self.child_id, self.child.pid)

    def _write_pids(self) -> None:
        path = device_lock_path(self.settings, self.device).with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        assert self.child is not None
        info = {"supervisor": os.getpid(), "worker": self.child.pid, "worker_id": self.child_id}
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)

    def _read_reports(self, timeout: float) -> None:
        """Wait up to `timeout` for the child's next report lines and take them in."""
        if self._eof:  # the child closed its end (it is exiting): nothing more will come
            self.stopping.wait(timeout)
            return
        ready, _, _ = select.select([self._read_fd], [], [], timeout)
        if not ready:
            return
        chunk = os.read(self._read_fd, 4096)
        self._eof = not chunk
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            words = line.decode().split()
            if words[:1] == ["job"] and len(words) == 3:
                self.running = _Running(uuid.UUID(words[1]), words[2], time.monotonic())
            elif words[:1] == ["idle"]:
                self.running = None

    # ---- the watch -----------------------------------------------------------------------------
    def _should_replace(self) -> str | None:
        """Why the child must be replaced now (None: leave it be)."""
        run, child = self.running, self.child
        if run is None or child is None:
            return None
        now = time.monotonic()
        grace = self.settings.cancel_grace_seconds
        if run.budget is None:
            run.budget = budget_reason(self.settings, run.kind, now - run.since, resident_bytes(child.pid))
            if run.budget is not None:
                run.stop_since = now
                if "memory" in run.budget:  # memory does not wait out a grace period
                    return run.budget
        if run.stop_since is None:
            try:
                with self.store.session(write=False) as s:
                    row = s.execute(sql_select(Job.status, Job.worker_id).where(Job.id == run.job_id)).first()
            except Exception as e:  # the job store is unreachable: judge again at the next tick
                log.warning("supervisor: cannot read job %s (%s)", run.job_id, e)
                return None
            if row is None or row.status != "running" or row.worker_id != self.child_id:
                run.stop_since = now
        if run.stop_since is not None and now - run.stop_since > grace:
            return run.budget or f"job {run.job_id} should have stopped (cancelled or lost) {grace:g} s ago"
        return None

    def _replace(self, reason: str) -> None:
        run, child = self.running, self.child
        assert child is not None
        log.warning("supervisor: killing worker %s (pid %d): %s", self.child_id, child.pid, reason)
        child.kill()
        child.wait()
        self.replaced += 1
        if run is None:
            return
        try:
            if run.budget is not None:
                ops.finish_running(self.store, run.job_id, self.child_id, status="failed", error=run.budget)
            message = f"worker {self.child_id} killed by its supervisor: {reason}"
            with self.store.session() as s:
                s.execute(insert(JobLog).values(job_id=run.job_id, level="WARNING", message=message[:4000]))
        except Exception as e:  # unreachable store: the job's lease expires and it is re-queued instead
            log.warning("supervisor: could not record the end of job %s (%s)", run.job_id, e)

    def _stop_child(self) -> None:
        """On shutdown: SIGTERM, a grace period, then SIGKILL and hand the job back to the queue."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=self.settings.cancel_grace_seconds)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            if self.running is not None:
                with contextlib.suppress(Exception):  # else its lease expires and it is re-queued
                    ops.finish_running(self.store, self.running.job_id, self.child_id, status="queued")

    def run(self) -> int:
        """Supervise until stopped (or until the child exits cleanly: max jobs, idle exit)."""
        die_with_parent(signal.SIGTERM)
        tick = min(self.settings.poll_seconds, self.settings.cancel_grace_seconds / 4, 1.0)
        self._spawn()
        try:
            while True:
                assert self.child is not None
                self._read_reports(tick)
                code = self.child.poll()
                if code is not None:
                    if self.stopping.is_set() or code == 0:
                        return code
                    log.error("supervisor: worker %s exited with %d; starting another", self.child_id, code)
                    self.stopping.wait(self.settings.poll_seconds)
                    self._spawn()
                    continue
                if self.stopping.is_set():
                    self._stop_child()
                    return 0
                reason = self._should_replace()
                if reason is not None:
                    self._replace(reason)
                    self._spawn()
        finally:
            self._stop_child()
            self.store.dispose()
