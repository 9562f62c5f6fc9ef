"""The worker loop: requeue expired leases, claim by policy, run the handler with a heartbeat thread.

A job ends `ingesting` (the service then loads its parts into DuckDB), `failed` (with a one-line
error), or, on SIGTERM, back in `queued` so another worker resumes it from its parts.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import InterfaceError, OperationalError

from crosspatch.app.config import Settings
from crosspatch.app.queue import ops
from crosspatch.app.services.paths import model_ref_to_open
from crosspatch.app.store.models import Job, Pair
from crosspatch.app.store.session import Store
from crosspatch.app.worker.context import JobCancelled, JobContext
from crosspatch.app.worker.executor import PairSource, make_executor
from crosspatch.app.worker.handlers import run_job  # imports the engine before any claim (lease clock)
from crosspatch.app.worker.shared_cache import SharedCache
from crosspatch.app.worker.supervisor import budget_reason, resident_bytes
from crosspatch.engine.errors import CrosspatchError

if TYPE_CHECKING:
    from crosspatch.engine.admission import Workload
    from crosspatch.engine.pairs import ModelPair
    from crosspatch.engine.staged import StagedPair

log = logging.getLogger(__name__)

# The job store is unreachable (a PostgreSQL restart, a network cut): no job's fault.
STORE_DOWN = (OperationalError, InterfaceError)


def device_memory_bytes(device: str) -> int:
    """Total memory of `device` (a CUDA GPU's, or the host's RAM for cpu)."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _reset_peak(device: str) -> None:
    """Start a job's CUDA peak-memory count afresh (CPU: the process's peak RSS cannot be reset)."""
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)


def _peak(device: str) -> int:
    from crosspatch.engine.admission import peak_memory_bytes

    return peak_memory_bytes(device)


class Worker:
    """One worker on one device; keeps the last pair it loaded warm."""

    def __init__(
        self,
        settings: Settings,
        device: str = "cpu",
        worker_id: str | None = None,
        status_fd: int | None = None,
    ) -> None:
        self.settings = settings
        self.device = device
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{device}:{uuid.uuid4().hex[:6]}"
        self.store = Store.from_settings(settings)
        # what the queue's memory fit offers this worker: explicit, else the admission budget, else the device
        self.memory_bytes = (
            settings.worker_memory_bytes or self.memory_budget() or device_memory_bytes(device)
        )
        self.stopping = threading.Event()
        self._pair: ModelPair | None = None
        self._pair_id: str | None = None
        self._status_fd = status_fd  # a supervisor reads `job <id> <kind>` / `idle` lines here
        self.executor = make_executor(settings, self.pair_source)  # local, or one Ray actor per pair
        self.shared_cache = SharedCache(
            self.store, settings.data_dir / "shared_cache", settings.shared_cache_bytes
        )

    def _report(self, line: str) -> None:
        if self._status_fd is None:
            return
        try:
            os.write(self._status_fd, f"{line}\n".encode())
        except OSError:  # the supervisor is gone; the kernel ends us too (PR_SET_PDEATHSIG)
            self._status_fd = None

    # ---- models ------------------------------------------------------------------------------
    def pair_source(self, pair_id: str) -> PairSource:
        """How to open `pair_id`: its allow-list row, paths checked against the model roots."""
        with self.store.session(write=False) as s:
            row = s.get(Pair, pair_id)
            if row is None:
                raise CrosspatchError(f"pair {pair_id!r} is not on the allow-list")
            pt, it, family = row.pt, row.it, row.family
        # checked here, by the process that opens them, on the real paths (not by the API at registration)
        pt = model_ref_to_open(pt, self.settings.model_roots, f"pair {pair_id!r} pt")
        it = model_ref_to_open(it, self.settings.model_roots, f"pair {pair_id!r} it")
        return PairSource(pair_id, str(pt), str(it), family, self.settings.dtype, self.device)

    def memory_budget(self) -> int | None:
        """Bytes a job may use on this worker's devices (`device_memory_gb` x devices); None: no budget."""
        gb = self.settings.device_memory_gb
        if gb is None:
            return None
        from crosspatch.engine.pairs import DEVICE_MAPS

        n = 1
        if self.device in DEVICE_MAPS:
            import torch

            n = max(1, torch.cuda.device_count())
        return int(gb * 1e9 * n)

    def load_pair(
        self, pair_id: str, workload: Workload | None = None, admission: dict[str, Any] | None = None
    ) -> ModelPair | StagedPair:
        """The pair for `pair_id`, from the allow-list; reuses the one already loaded.

        With a memory budget the job's estimate (engine.admission, from config.json) decides: lockstep (a
        warm `ModelPair`), staged (a `StagedPair`, only for jobs that pass their `workload`), or refusal
        (`MemoryAdmissionError` with the estimate). `admission` receives the decision for provenance.
        """
        if self._pair_id == pair_id and self.memory_budget() is None:
            return self._pair  # warm, and no budget to check against
        src = self.pair_source(pair_id)
        pt, it, family = src.pt, src.it, src.family
        mode = self._admit(pt, workload, admission)
        if mode == "staged":
            from crosspatch.engine.staged import load_staged_pair

            self._pair = self._pair_id = None  # free the warm pair first
            log.info("loading pair %s staged on %s", pair_id, self.device)
            return load_staged_pair(
                pt, it, device=self.device, dtype=self.settings.dtype, family=family, pair_id=pair_id
            )
        if self._pair_id == pair_id:
            return self._pair
        from crosspatch.engine.pairs import load_pair

        self._pair = self._pair_id = None
        log.info("loading pair %s on %s", pair_id, self.device)
        self._pair = load_pair(
            pt, it, device=self.device, dtype=self.settings.dtype, family=family, pair_id=pair_id
        )
        self._pair_id = pair_id
        return self._pair

    def _admit(self, pt: str, workload: Workload | None, admission: dict[str, Any] | None) -> str:
        """lockstep / staged for a job on the pair whose PT is `pt`; raises when even staged does not fit."""
        budget = self.memory_budget()
        if budget is None and workload is None:
            return "lockstep"
        from crosspatch.engine.admission import MemoryAdmissionError, Workload, admit, read_shape

        try:
            shape = read_shape(str(pt))
        except CrosspatchError as e:  # a hub id: no local config.json to size it from
            log.warning("no memory estimate: %s", e)
            return "lockstep"
        mode, est = admit(shape, workload or Workload(1, 0, 0, 1), self.settings.dtype, budget)
        if mode == "staged" and workload is None:
            raise MemoryAdmissionError(
                f"job needs both models resident but does not fit the budget of {budget / 1e9:.2f} GB: "
                f"{est.describe()}; only divergence and crosspatch jobs on first_diff events without controls "
                "run staged (one model resident)"
            )
        if admission is not None:
            admission.update(
                mode=mode, budget_bytes=budget, estimate_bytes=est.to_dict(), note=est.describe()
            )
        return mode

    # ---- loop --------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop after handing the current job back to the queue."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("worker %s: signal %d, stopping", self.worker_id, signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def run(self, *, max_jobs: int | None = None, exit_when_idle: bool = False) -> int:
        """Claim and run jobs until stopped (or `max_jobs` ran, or idle with `exit_when_idle`)."""
        ran = 0
        log.info("worker %s on %s (%.1f GiB) started", self.worker_id, self.device, self.memory_bytes / 2**30)
        while not self.stopping.is_set() and (max_jobs is None or ran < max_jobs):
            try:
                ops.requeue_expired(self.store, max_losses=self.settings.worker_max_losses)
                job_id = ops.claim(
                    self.store,
                    self.worker_id,
                    lease_seconds=self.settings.lease_seconds,
                    memory_bytes=self.memory_bytes,
                    loaded_pair=self._pair_id,
                )
                if job_id is not None:
                    self.run_one(job_id)
                    ran += 1
                    continue
            except STORE_DOWN as e:  # PostgreSQL restarting: wait and ask again (held jobs' leases expire)
                log.warning("worker %s: job store unreachable (%s); retrying", self.worker_id, e)
                self.stopping.wait(self.settings.poll_seconds)
                continue
            if exit_when_idle:
                break
            self.stopping.wait(self.settings.poll_seconds)
        self.store.dispose()
        self.executor.close()
        return ran

    def run_one(self, job_id: uuid.UUID) -> str:
        """Run one claimed job to its next status; returns that status."""
        with self.store.session(write=False) as s:
            job = s.get(Job, job_id)
            assert job is not None
            spec, kind = dict(job.spec), job.kind
        self._report(f"job {job_id} {kind}")
        try:
            return self._run_one(job_id, spec, kind)
        finally:
            self._report("idle")

    def _run_one(self, job_id: uuid.UUID, spec: dict[str, Any], kind: str) -> str:

        ctx = JobContext(
            self.store,
            job_id,
            self.worker_id,
            self.settings.data_dir,
            lease_seconds=self.settings.lease_seconds,
            device=self.device,
            dtype=self.settings.dtype,
            load_pair=self.load_pair,
            stopping=self.stopping,
            executor=self.executor,
            shared_cache=self.shared_cache,
            staged_state_bytes=self.settings.staged_state_bytes,
        )
        ctx.provenance["executor"] = self.executor.describe()
        beat_stop = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(ctx, beat_stop, kind), daemon=True, name=f"heartbeat-{job_id}"
        )
        beat.start()
        t0 = time.monotonic()
        _reset_peak(self.device)
        try:
            ctx.log(f"{kind} started on {self.worker_id} ({self.device})")
            run_job(spec, ctx)
            ctx.check_cancel()
        except JobCancelled:
            return self._after_stop(ctx)
        except STORE_DOWN:
            raise  # not the job's fault: the job store is unreachable; its lease expires, it is re-queued
        except Exception as e:
            if ctx.should_cancel():
                return self._after_stop(ctx)
            message = (
                str(e)
                if isinstance(e, CrosspatchError | ValueError | NotImplementedError)
                else (f"internal error in the worker ({type(e).__name__}: {e})")
            )
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            ctx.log(f"failed: {message}", level="ERROR")
            ops.finish_running(self.store, job_id, self.worker_id, status="failed", error=message[:4000])
            return "failed"
        finally:
            beat_stop.set()
            beat.join()
        ctx.provenance.update(self._provenance(kind, spec))
        ctx.provenance["memory"] = {**ctx.memory, "measured_peak_bytes": _peak(self.device)}
        ctx.log(f"{kind} finished in {time.monotonic() - t0:.1f}s; waiting for ingest")
        progress = {"fraction": 1.0, "message": "ingesting"}
        ok = ops.finish_running(
            self.store,
            job_id,
            self.worker_id,
            status="ingesting",
            provenance=ctx.provenance,
            progress=progress,
        )
        return "ingesting" if ok else (ops.status_of(self.store, job_id) or "lost")

    def _after_stop(self, ctx: JobContext) -> str:
        if not ctx.lost and ctx.budget_exceeded is not None:
            ctx.log(f"failed: {ctx.budget_exceeded}", level="ERROR")
            ops.finish_running(
                self.store, ctx.job_id, self.worker_id, status="failed", error=ctx.budget_exceeded
            )
            return "failed"
        if not ctx.lost and self.stopping.is_set():
            ops.finish_running(self.store, ctx.job_id, self.worker_id, status="queued")
            ctx.log("worker stopping: job handed back to the queue", level="WARNING")
            return "queued"
        status = ops.status_of(self.store, ctx.job_id) or "lost"
        log.info("job %s stopped (now %s)", ctx.job_id, status)
        return status

    def _beat(self, ctx: JobContext, stop: threading.Event, kind: str) -> None:
        """Renew the lease; stop the job (at its next check) once it is past its time or memory budget."""
        period = min(self.settings.heartbeat_seconds, self.settings.lease_seconds / 3)
        t0 = time.monotonic()
        while not stop.wait(period):
            reason = budget_reason(self.settings, kind, time.monotonic() - t0, resident_bytes(os.getpid()))
            if reason is not None:
                ctx.stop_over_budget(reason)
            if not ctx.heartbeat():
                log.info("job %s: no longer held (cancelled or lease lost)", ctx.job_id)
                return

    def _provenance(self, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        import platform
        from importlib.metadata import PackageNotFoundError, version

        versions: dict[str, str] = {"python": platform.python_version()}
        for pkg in ("crosspatch", "torch", "transformers", "pyarrow", "numpy"):
            try:
                versions[pkg] = version(pkg)
            except PackageNotFoundError:
                versions[pkg] = "absent"
        return {
            "kind": kind,
            "spec": spec,
            "device": self.device,
            "dtype": self.settings.dtype,
            "versions": versions,
        }
