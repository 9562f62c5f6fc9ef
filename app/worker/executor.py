"""Where a job's chunks run: in the worker process (`local`) or in a warm Ray actor per pair (`ray`).

Handlers describe one chunk as a `ChunkTask` and ask the job context's executor for its Arrow tables;
`run_chunk` is the one chunk function both executors run, so handlers have a single code path. With Ray
the worker stays the job's only writer: it gets the chunk's tables back as Arrow, writes the parts and
records them in the job store (idempotent per chunk), and the service ingests them into DuckDB as for any
job. A lost actor re-queues its chunk on a fresh actor (nothing was written for it, so no row lands twice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from crosspatch.engine.errors import CrosspatchError

if TYPE_CHECKING:
    from crosspatch.app.config import Settings
    from crosspatch.app.worker.context import JobContext
    from crosspatch.engine.pairs import ModelPair
    from crosspatch.engine.prompts import PromptRecord

log = logging.getLogger(__name__)

# Fault injection for the Ray tests: with this variable set to a chunk name (`00001`), the first actor
# asked for that chunk writes `.held-<name>` in the job's parts directory and blocks, so a test can
# ray.kill it at a known point; the re-created actor finds the marker and runs the chunk.
HOLD_CHUNK_ENV = "CROSSPATCH_FAULT_HOLD_CHUNK"
RAY_NAMESPACE = "crosspatch"


@dataclass(frozen=True)
class ChunkTask:
    """One chunk of a job, everything an executor needs to compute its tables (picklable)."""

    name: str  # the parts' suffix, e.g. "00003" or "<pair tag>00003"
    prompts: tuple[PromptRecord, ...]
    max_new_tokens: int
    batch_size: int
    chat_template: bool = False
    event: str = "first_diff"
    boundaries: tuple[int, ...] | None = None  # None: divergence events only, no 2x2
    readouts: tuple[str, ...] = ("pt", "it")
    check_noop: bool = False


@dataclass(frozen=True)
class PairSource:
    """How to open a registered pair (the allow-list row, paths checked by the worker)."""

    pair_id: str
    pt: str
    it: str
    family: str | None
    dtype: str
    device: str

    @property
    def key(self) -> str:
        """Content address of the loaded pair: one warm actor per key."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def run_chunk(
    pair: ModelPair, task: ChunkTask, on_batch: Callable[[int, int], None] | None = None
) -> dict[str, pa.Table]:
    """First divergences of the chunk's prompts and (with boundaries) their 2x2 cells, as Arrow tables."""
    from crosspatch.engine.crosspatch import crosspatch as run_crosspatch
    from crosspatch.engine.divergence import iter_divergences
    from crosspatch.engine.results import events_table

    batches = iter_divergences(
        pair,
        list(task.prompts),
        max_new_tokens=task.max_new_tokens,
        batch_size=task.batch_size,
        chat_template=task.chat_template,
        event=task.event,
        on_batch=on_batch,
        capture=task.boundaries if task.event == "first_diff" else None,  # the fused 2x2
    )
    events = [e for batch in batches for e in batch]
    out = {"events": events_table(events, pair.family, pair.pair_id)}
    if task.boundaries is not None:
        out["cells"] = run_crosspatch(
            pair,
            events,
            boundary=list(task.boundaries),
            readouts=task.readouts,
            batch_size=task.batch_size,
            check_noop=task.check_noop,
            on_batch=on_batch,
        )
    return out


class Executor(Protocol):
    """Runs a job's chunks; `describe` goes into the job's provenance."""

    kind: str

    def run_chunk(self, ctx: JobContext, pair_id: str, task: ChunkTask) -> dict[str, pa.Table]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Today's path: the chunk runs in the worker process on its warm pair."""

    kind = "local"

    def run_chunk(self, ctx: JobContext, pair_id: str, task: ChunkTask) -> dict[str, pa.Table]:
        """The chunk's tables, computed here (the engine's per-batch callback is the job's cancel point)."""
        return run_chunk(ctx.load_pair(pair_id), task, ctx.cancel_point)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def close(self) -> None:
        return None


def import_ray() -> Any:
    """The `ray` module, or a CrosspatchError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise CrosspatchError(
            "executor=ray needs Ray: pip install 'crosspatch[ray]' (or set CROSSPATCH_EXECUTOR=local)"
        ) from e
    return ray


class PairActor:
    """A Ray actor holding one loaded pair warm; runs chunks on it (serially)."""

    def __init__(self, source: PairSource) -> None:
        from crosspatch.engine.pairs import load_pair

        self.source = source
        self.pair = load_pair(
            source.pt,
            source.it,
            device=source.device,
            dtype=source.dtype,
            family=source.family,
            pair_id=source.pair_id,
        )
        self.chunks = 0

    def run(self, task: ChunkTask, hold_marker: str | None = None) -> dict[str, pa.Table]:
        """Run one chunk on the warm pair (blocks first when a test asked it to hold on this chunk)."""
        if hold_marker is not None and not os.path.exists(hold_marker):
            Path(hold_marker).write_text(str(os.getpid()))
            threading.Event().wait()  # until the test kills this actor
        self.chunks += 1
        return run_chunk(self.pair, task)

    def info(self) -> dict[str, Any]:
        """Who this actor is and how much it ran (tests and `ray list actors` read it)."""
        return {
            "pid": os.getpid(),
            "pair_id": self.source.pair_id,
            "key": self.source.key,
            "chunks": self.chunks,
        }


def actor_name(source: PairSource) -> str:
    """The pair actor's name in the `crosspatch` Ray namespace (any worker on the cluster finds it)."""
    return f"pair-{source.pair_id}-{source.key}"


class RayExecutor:
    """Chunks run in one named, warm Ray actor per loaded pair (`num_gpus` each); results come back as Arrow."""

    kind = "ray"

    def __init__(
        self,
        pair_source: Callable[[str], PairSource],
        *,
        address: str | None = None,
        num_gpus: float = 0.0,
        retries: int = 3,
        poll_seconds: float = 0.5,
    ) -> None:
        self.ray = import_ray()
        if not self.ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or "auto"
            try:
                self.ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise CrosspatchError(
                    f"executor=ray cannot join the Ray cluster at {address!r} ({e}); start one "
                    "(`ray start --head`) or set CROSSPATCH_RAY_ADDRESS / RAY_ADDRESS"
                ) from e
        self.pair_source = pair_source
        self.num_gpus, self.retries, self.poll_seconds = num_gpus, retries, poll_seconds
        self._actor_cls = self.ray.remote(PairActor)
        self._actors: dict[str, Any] = {}

    def actor(self, source: PairSource) -> Any:
        """The pair's warm actor: this worker's handle, else the cluster's by name, else a new one."""
        name = actor_name(source)
        if name not in self._actors:
            self._actors[name] = self._actor_cls.options(
                name=name,
                namespace=RAY_NAMESPACE,
                get_if_exists=True,
                num_gpus=self.num_gpus,
                num_cpus=1,
                max_concurrency=1,
            ).remote(source)
        return self._actors[name]

    def run_chunk(self, ctx: JobContext, pair_id: str, task: ChunkTask) -> dict[str, pa.Table]:
        """The chunk's tables from the pair's actor; a lost actor re-queues the chunk on a new one."""
        from ray.exceptions import RayActorError

        device = "cuda" if self.num_gpus else "cpu"  # inside the actor: the GPU Ray gave it, or none
        source = replace(self.pair_source(pair_id), device=device)
        hold = None
        if os.environ.get(HOLD_CHUNK_ENV) == task.name:
            hold = str(ctx.checkpoint_dir / f".held-{task.name}")
        for attempt in range(self.retries + 1):
            ref = self.actor(source).run.remote(task, hold)
            try:
                while not self.ray.wait([ref], timeout=self.poll_seconds)[0]:
                    ctx.check_cancel()  # the job's cancellation point while the actor works
                return self.ray.get(ref)
            except RayActorError as e:
                self._actors.pop(actor_name(source), None)
                record = ctx.provenance.setdefault("executor", self.describe())
                record["lost_chunks"] = int(record.get("lost_chunks", 0)) + 1
                ctx.log(
                    f"ray actor of {pair_id} lost on chunk {task.name} (attempt {attempt + 1}): "
                    f"re-queued ({type(e).__name__})",
                    level="WARNING",
                )
        raise CrosspatchError(
            f"chunk {task.name} of {pair_id}: its Ray actor was lost {self.retries + 1} times"
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_gpus": self.num_gpus, "lost_chunks": 0}

    def close(self) -> None:
        """Forget this worker's handles (named actors stay warm on the cluster while it lives)."""
        self._actors.clear()


def make_executor(settings: Settings, pair_source: Callable[[str], PairSource]) -> Executor:
    """The executor `settings.executor` names."""
    if settings.executor == "local":
        return LocalExecutor()
    num_gpus = settings.ray_num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if settings.device.startswith("cuda") else 0.0
    return RayExecutor(
        pair_source,
        address=settings.ray_address,
        num_gpus=num_gpus,
        retries=settings.ray_chunk_retries,
        poll_seconds=min(settings.poll_seconds, 0.5),
    )
