"""What a job handler gets: progress, logs, checkpoint parts, cancellation, and the loaded pair."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, overload

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import func, insert, select

from crosspatch.app.queue import ops
from crosspatch.app.store.layout import parts_dir
from crosspatch.app.store.models import Job, JobLog, JobPart
from crosspatch.app.store.result_tables import PART_SCHEMAS, conform
from crosspatch.app.store.session import Store
from crosspatch.app.worker.executor import Executor, LocalExecutor
from crosspatch.app.worker.shared_cache import SharedCache

if TYPE_CHECKING:
    from crosspatch.engine.admission import Workload
    from crosspatch.engine.pairs import ModelPair
    from crosspatch.engine.staged import StagedPair
    from crosspatch.saes.load import Dictionary

log = logging.getLogger(__name__)

# Fault injection for crash tests: a worker started with this variable set to N stops making progress
# once the job holds N parts (it writes `HELD_MARKER` in the job's parts directory and blocks), so a test
# can SIGKILL it at a known point instead of racing the clock.
HOLD_AFTER_PARTS_ENV = "CROSSPATCH_FAULT_HOLD_AFTER_PARTS"
HELD_MARKER = ".held"
# Fault injection for the OOM path: a batch larger than N raises a simulated torch.OutOfMemoryError after it
# ran (mid-chunk), so the job must halve its batch and redo the chunk.
OOM_ABOVE_BATCH_ENV = "CROSSPATCH_FAULT_OOM_ABOVE_BATCH"


class PairLoader(Protocol):
    """The worker's pair loader: a warm `ModelPair`, or under a memory budget a `StagedPair` for a job
    that passes its `workload` (the decision goes into `admission`)."""

    def __call__(
        self, pair_id: str, workload: Workload | None = None, admission: dict[str, Any] | None = None
    ) -> ModelPair | StagedPair: ...


class JobCancelled(Exception):
    """Raised inside a handler when the job was cancelled, its lease lost, or the worker is stopping."""


class JobContext:
    """The handler's window onto its job. Thread-safe progress; parts are atomic (tmp + rename)."""

    def __init__(
        self,
        store: Store,
        job_id: uuid.UUID,
        worker_id: str,
        data_dir: Path,
        *,
        lease_seconds: float,
        device: str,
        dtype: str,
        load_pair: PairLoader,
        stopping: threading.Event,
        executor: Executor | None = None,
        shared_cache: SharedCache | None = None,
        staged_state_bytes: int = 2 << 30,
    ) -> None:
        self.store, self.job_id, self.worker_id = store, job_id, worker_id
        self.lease_seconds = lease_seconds
        self.device, self.dtype = device, dtype
        self.checkpoint_dir = parts_dir(data_dir, job_id)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.provenance: dict[str, Any] = {}
        self.memory: dict[str, Any] = {}  # admission: mode, budget, estimate; the worker adds the peak
        self.staged_state_bytes = staged_state_bytes  # host memory for a staged job's stored states
        self._load_pair = load_pair
        self.executor: Executor = executor or LocalExecutor()  # where handlers run their chunks
        self.shared_cache = shared_cache  # dictionaries / activation caches reused across jobs; None: off
        self._stopping = stopping
        self._lost = threading.Event()
        self.budget_exceeded: str | None = None  # why the job must stop, when past its time/memory budget
        self._progress: dict[str, Any] = {"fraction": 0.0, "message": "started"}
        self._lock = threading.Lock()
        self._last_flush = 0.0

    # ---- reporting ---------------------------------------------------------------------------
    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in [0, 1]; stored with the next heartbeat (at most ~2/s). Also a cancellation
        point: raises `JobCancelled` once the job should stop."""
        self.check_cancel()
        with self._lock:
            self._progress = {"fraction": max(0.0, min(1.0, float(fraction))), "message": message}
        if time.monotonic() - self._last_flush > 0.5:
            self.heartbeat()

    def log(self, message: str, level: str = "INFO") -> None:
        """Append a line to the job's log."""
        log.info("job %s: %s", self.job_id, message)
        try:
            with self.store.session() as s:
                s.execute(insert(JobLog).values(job_id=self.job_id, level=level, message=message[:4000]))
        except Exception as e:  # a log line lost to a job-store outage must not fail the job
            log.warning("job %s: log line not stored (%s)", self.job_id, e)

    def heartbeat(self) -> bool:
        """Renew the lease and store progress; on failure the job is no longer ours."""
        with self._lock:
            progress = dict(self._progress)
        self._last_flush = time.monotonic()
        try:
            held = ops.heartbeat(
                self.store, self.job_id, self.worker_id, lease_seconds=self.lease_seconds, progress=progress
            )
        except Exception as e:  # a transient database error must not kill the job
            log.warning("heartbeat of job %s failed: %s", self.job_id, e)
            return True
        if not held:
            self._lost.set()
        return held

    # ---- cancellation ------------------------------------------------------------------------
    def should_cancel(self) -> bool:
        """True once the job was cancelled, its lease was lost, or the worker is stopping."""
        return self._lost.is_set() or self._stopping.is_set() or self.budget_exceeded is not None

    def stop_over_budget(self, reason: str) -> None:
        """Make the handler stop at its next check; the worker then fails the job with `reason`."""
        self.budget_exceeded = reason

    def check_cancel(self) -> None:
        """Raise `JobCancelled` if the handler should stop now."""
        if self.should_cancel():
            raise JobCancelled(str(self.job_id))

    def cancel_point(self, done: int = 0, total: int = 0) -> None:
        """The engine's per-batch callback (`on_batch(done, total)`): a cancellation point, and the
        batch count within the current step stored with the progress (`progress.batch`)."""
        with self._lock:
            self._progress = {**self._progress, "batch": [done, total]}
        self.check_cancel()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    # ---- checkpoint parts --------------------------------------------------------------------
    def completed_parts(self) -> dict[str, Path]:
        """Parts already written by this or an earlier attempt: name -> path."""
        with self.store.session(write=False) as s:
            rows = s.execute(select(JobPart.name, JobPart.path).where(JobPart.job_id == self.job_id)).all()
        return {name: Path(path) for name, path in rows if Path(path).exists()}

    def write_part(self, name: str, table: pa.Table) -> Path:
        """Write a finished part `<table>.<suffix>` (e.g. `cells.00003`) and record it (idempotent)."""
        table_name = name.split(".", 1)[0]
        if table_name not in PART_SCHEMAS or "/" in name or ".." in name:
            raise ValueError(
                f"part name {name!r} must be '<table>.<suffix>' with table in {list(PART_SCHEMAS)}"
            )
        self.check_cancel()
        data = conform(table_name, table)
        path = self.checkpoint_dir / f"{name}.parquet"
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        pq.write_table(data, tmp)
        os.replace(tmp, path)
        with self.store.session() as s:
            job = s.get(Job, self.job_id)
            if job is None or job.status != "running" or job.worker_id != self.worker_id:
                self._lost.set()
                raise JobCancelled(str(self.job_id))
            exists = s.scalar(select(JobPart.id).where(JobPart.job_id == self.job_id, JobPart.name == name))
            n_parts = 0
            if exists is None:
                n = s.scalar(select(func.count()).select_from(JobPart).where(JobPart.job_id == self.job_id))
                s.add(
                    JobPart(
                        job_id=self.job_id,
                        part_index=n or 0,
                        name=name,
                        table_name=table_name,
                        path=str(path),
                        rows=data.num_rows,
                    )
                )
                n_parts = (n or 0) + 1
        self._hold_if_asked(n_parts)  # after the commit: the part is recorded
        return path

    def _hold_if_asked(self, n_parts: int) -> None:
        """Block forever once the job holds `HOLD_AFTER_PARTS_ENV` parts (crash tests only)."""
        hold_after = os.environ.get(HOLD_AFTER_PARTS_ENV)
        if hold_after is None or n_parts < int(hold_after):
            return
        (self.checkpoint_dir / HELD_MARKER).write_text(str(n_parts))
        log.warning("job %s: holding after %d parts (%s is set)", self.job_id, n_parts, HOLD_AFTER_PARTS_ENV)
        threading.Event().wait()

    def read_parts(self, table_name: str, prefix: str = "") -> pa.Table | None:
        """Finished parts of one table (whose suffix starts with `prefix`), in name order; None if none."""
        paths = [
            p
            for n, p in sorted(self.completed_parts().items())
            if n.split(".", 1)[0] == table_name and n.split(".", 1)[1].startswith(prefix)
        ]
        if not paths:
            return None
        return pa.concat_tables([pq.read_table(p) for p in paths])

    def dictionary_path(self, dictionary_id: str) -> Path:
        """Where a registered dictionary lives (from the job store's dictionaries table)."""
        from crosspatch.app.store.models import Dictionary

        with self.store.session(write=False) as s:
            d = s.get(Dictionary, dictionary_id)
            if d is None:
                raise ValueError(f"unknown dictionary {dictionary_id!r}")
            return Path(d.path)

    def register_dictionary(self, dictionary: Dictionary, pair: ModelPair) -> str:
        """Record a dictionary this job trained in the job store's registry (upsert by id); returns its id."""
        from crosspatch.app.store.models import Dictionary, Job

        meta = dictionary.meta
        dict_id = str(dictionary.id)[:64]
        role = {"it": "IT", "pt": "PT"}.get(str(meta.get("model_role", "")).lower(), "paired")
        with self.store.session() as s:
            job = s.get(Job, self.job_id)
            row = s.get(Dictionary, dict_id) or Dictionary(id=dict_id)
            row.pair_id, row.family, row.model_role = pair.pair_id, pair.family, role
            row.layer, row.hook_point = int(dictionary.layer), str(dictionary.hook_point)
            row.kind, row.architecture = dictionary.kind, str(meta.get("architecture"))
            row.width, row.k = int(dictionary.n_latents), meta.get("k")
            row.training_tokens = meta.get("training_tokens")
            row.metrics, row.gate_status = dict(meta.get("metrics") or {}), dictionary.gate_status
            row.path = str(dictionary.path)
            row.created_by = getattr(job, "owner_id", None)
            s.add(row)
        return dict_id

    # ---- models ------------------------------------------------------------------------------
    @overload
    def load_pair(self, pair_id: str) -> ModelPair: ...

    @overload
    def load_pair(self, pair_id: str, workload: Workload | None) -> ModelPair | StagedPair: ...

    def load_pair(self, pair_id: str, workload: Workload | None = None) -> ModelPair | StagedPair:
        """The worker's warm `ModelPair` for `pair_id` (loaded on first use).

        A job that can run staged passes its `workload` (engine.admission.Workload): under a memory budget
        it may get a `StagedPair` (one model resident) instead; the decision lands in `memory`.
        """
        if workload is None:
            return self._load_pair(pair_id)  # no workload: never staged
        return self._load_pair(pair_id, workload=workload, admission=self.memory)
