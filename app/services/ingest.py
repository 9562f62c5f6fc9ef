"""Ingest: the service loads a finished job's Parquet parts into DuckDB, then marks it succeeded.

Runs in the service process (the DuckDB owner) on a background thread that also re-queues jobs whose
worker's lease expired.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import select, update

from crosspatch.app.config import Settings
from crosspatch.app.queue import ops
from crosspatch.app.services import plots
from crosspatch.app.store.duckdb import ResultsError, ResultsStore
from crosspatch.app.store.models import Job, JobLog, JobPart, utcnow
from crosspatch.app.store.session import Store

log = logging.getLogger(__name__)


def ingest_job(store: Store, results: ResultsStore, job_id: uuid.UUID, data_dir: Path | None = None) -> str:
    """Load one `ingesting` job's parts (one DuckDB transaction) and mark it succeeded or failed.

    With `data_dir`, a succeeded job's figures are drawn into `data_dir/jobs/<id>/figures` first
    (unless its spec says `figures: false`); a figure that fails is logged, never fails the job.
    """
    with store.session(write=False) as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "ingesting":
            return job.status if job else "missing"
        parts = [
            (p.table_name, p.path)
            for p in s.scalars(select(JobPart).where(JobPart.job_id == job_id).order_by(JobPart.name))
        ]
        prov = {"kind": job.kind, "spec": job.spec, "provenance": job.provenance}
    try:
        counts = results.ingest(str(job_id), parts, prov)
    except ResultsError as e:
        status, message, error = "failed", f"ingest failed: {e}", str(e)
    else:
        status, error = "succeeded", None
        message = "ingested " + ", ".join(f"{n} {t}" for t, n in counts.items() if n)
        if data_dir is not None and (prov["spec"] or {}).get("figures", True):
            figures = plots.write_job_figures(results, data_dir, job_id)
            message += f"; {len(figures)} figure(s)" if figures else ""
    with store.session() as s:
        done = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "ingesting")
            .values(
                status=status,
                error=error,
                finished_at=utcnow(),
                progress={"fraction": 1.0, "message": status},
            )
            .returning(Job.id)
        ).first()
        s.add(JobLog(job_id=job_id, level="INFO" if status == "succeeded" else "ERROR", message=message))
    if done is None:  # cancelled meanwhile: its rows must not linger
        results.delete_job(str(job_id))
        return "cancelled"
    return status


def ingest_ready(store: Store, results: ResultsStore, data_dir: Path | None = None) -> list[uuid.UUID]:
    """Ingest every job waiting in `ingesting` (drawing figures under `data_dir`); returns their ids."""
    with store.session(write=False) as s:
        ready = list(s.scalars(select(Job.id).where(Job.status == "ingesting").order_by(Job.created_at)))
    for job_id in ready:
        ingest_job(store, results, job_id, data_dir)
    return ready


class Housekeeper:
    """Background thread of the service: ingest finished jobs, re-queue expired leases."""

    def __init__(self, settings: Settings, store: Store, results: ResultsStore) -> None:
        self.settings, self.store, self.results = settings, store, results
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="crosspatch-housekeeper")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        period = min(self.settings.poll_seconds, 1.0)
        last_requeue = 0.0
        while not self._stop.wait(period):
            try:
                ingest_ready(self.store, self.results, self.settings.data_dir)
                if time.monotonic() - last_requeue > self.settings.lease_seconds / 3:
                    last_requeue = time.monotonic()
                    for job_id in ops.requeue_expired(self.store, max_losses=self.settings.worker_max_losses):
                        log.warning("job %s: lease expired, re-queued", job_id)
            except Exception:
                log.exception("housekeeping failed; retrying")
