"""Where a job's chunks run: in the worker process (`local`) or in a warm Ray actor per pair (`ray`).

Handlers describe one chunk as a `ChunkTask` and ask for its Arrow tables (`staging.run_chunk`);
`staging.chunk_tables` is the one chunk function both executors run (OOM halving included), so handlers
have a single code path. With Ray the worker stays the job's only writer: it gets the chunk's tables back
as Arrow, writes the parts and records them in the job store (idempotent per chunk), and the service
ingests them into DuckDB as for any job. A lost actor re-queues its chunk on a fresh actor (nothing was
written for it, so no row lands twice); a stopping job cancels its chunk in the actor, which stays warm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from crosspatch.engine.errors import CrosspatchError

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

    from crosspatch.app.config import Settings
    from crosspatch.app.worker.context import JobContext
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


@dataclass(frozen=True)
class ActorCall:
    """How the worker asks an actor for one chunk: a unique token to cancel it by, and the fault hooks."""

    token: str  # job id, chunk name and a nonce: a cancel never reaches another attempt's chunk
    hold_marker: str | None = None  # HOLD_CHUNK_ENV: write this file and block until cancelled or killed
    oom_above_batch: int | None = None  # CROSSPATCH_FAULT_OOM_ABOVE_BATCH read by the worker


@dataclass
class ChunkResult:
    """What an actor sends back: the chunk's tables, its OOM halvings and its forward counts."""

    tables: dict[str, pa.Table]
    halvings: list[dict[str, int | str]] = field(default_factory=list)
    compute: dict[str, dict[str, int]] = field(default_factory=dict)


class ChunkCancelled(CrosspatchError):
    """An actor's chunk stopped at a batch boundary: its job was cancelled (the actor stays warm)."""


class ActorHooks:
    """`staging.ChunkHooks` inside a pair actor: the call's fault hook and cancel flag; halvings kept."""

    def __init__(self, call: ActorCall, cancelled: Callable[[], bool]) -> None:
        self.call, self.cancelled = call, cancelled
        self.halvings: list[dict[str, int | str]] = []

    def on_batch(self, batch_size: int) -> Callable[[int, int], None]:
        from crosspatch.app.worker.staging import oom_point

        def on_batch(_done: int, _total: int) -> None:
            oom_point(batch_size, self.call.oom_above_batch)
            self.check_cancel()

        return on_batch

    def check_cancel(self) -> None:
        if self.cancelled():
            raise ChunkCancelled(f"chunk {self.call.token} cancelled")

    def on_halve(self, stage: str, batch_size: int, error: BaseException) -> None:
        self.halvings.append({"stage": stage, "batch_size": batch_size, "error": str(error)})


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
        """The chunk's tables, computed here (`staging.run_chunk`: the job's cancel points, OOM halving)."""
        from crosspatch.app.worker.staging import run_chunk

        return run_chunk(ctx, ctx.load_pair(pair_id), task)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def close(self) -> None:
        return None


def import_ray() -> ModuleType:
    """The `ray` module, or a CrosspatchError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise CrosspatchError(
            "executor=ray needs Ray: pip install 'crosspatch[ray]' (or set CROSSPATCH_EXECUTOR=local)"
        ) from e
    return ray


class PairActor:
    """A Ray actor holding one loaded pair warm; runs its chunks one at a time, and takes cancels meanwhile.

    Threaded (two calls at once): `run` holds a lock, so chunks stay serial, while `cancel(token)` lands
    beside a running chunk, which stops at its next batch boundary (`ActorHooks`) and leaves the pair warm.
    """

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
        self.cancelled_chunks = 0
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()

    def run(self, task: ChunkTask, call: ActorCall) -> ChunkResult:
        """Run one chunk on the warm pair (`staging.chunk_tables`, the local path's function)."""
        from crosspatch.app.worker.staging import chunk_tables
        from crosspatch.engine.counting import count_forwards

        with self._lock:
            hooks = ActorHooks(call, lambda: call.token in self._cancelled)
            try:
                if call.hold_marker is not None and not os.path.exists(call.hold_marker):
                    Path(call.hold_marker).write_text(str(os.getpid()))
                    while not hooks.cancelled():  # until the test cancels the job or kills this actor
                        time.sleep(0.05)
                    hooks.check_cancel()
                self.chunks += 1
                with count_forwards(self.pair) as counts:
                    tables = chunk_tables(self.pair, task, hooks)
                return ChunkResult(tables, hooks.halvings, counts.to_dict())
            except ChunkCancelled:
                self.cancelled_chunks += 1
                raise
            finally:
                self._cancelled.discard(call.token)

    def cancel(self, token: str) -> None:
        """Stop the chunk running under `token` at its next batch boundary."""
        self._cancelled.add(token)

    def info(self) -> dict[str, Any]:
        """Who this actor is and how much it ran (tests and `ray list actors` read it)."""
        return {
            "pid": os.getpid(),
            "pair_id": self.source.pair_id,
            "key": self.source.key,
            "chunks": self.chunks,
            "cancelled_chunks": self.cancelled_chunks,
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
        stop_seconds: float = 10.0,
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
        self.stop_seconds = stop_seconds  # how long a stopping job waits for its actor's chunk to leave
        self._actor_cls = self.ray.remote(PairActor)
        self._actors: dict[str, ActorHandle] = {}

    def actor(self, source: PairSource) -> ActorHandle:
        """The pair's warm actor: this worker's handle, else the cluster's by name, else a new one.

        Detached: Ray ends a non-detached actor when its creator's handles are collected, even while other
        workers use it by name, so a stopping worker would take the pair's warm actor with it.
        """
        name = actor_name(source)
        if name not in self._actors:
            self._actors[name] = self._actor_cls.options(
                name=name,
                namespace=RAY_NAMESPACE,
                get_if_exists=True,
                lifetime="detached",  # the cluster's, not this worker's: a name lookup holds only a weak ref
                num_gpus=self.num_gpus,
                num_cpus=1,
                max_concurrency=2,  # a chunk and a cancel beside it (chunks stay serial)
            ).remote(source)
        return self._actors[name]

    def run_chunk(self, ctx: JobContext, pair_id: str, task: ChunkTask) -> dict[str, pa.Table]:
        """The chunk's tables from the pair's actor; a lost actor re-queues the chunk on a new one.

        While the actor works the worker polls the job's cancellation point; when the job stops, the actor
        is told to stop the chunk at its next batch boundary (it stays warm for the next job).
        """
        from ray.exceptions import RayActorError

        from crosspatch.app.worker.staging import oom_limit, record_halving
        from crosspatch.engine.counting import ForwardCounts

        device = "cuda" if self.num_gpus else "cpu"  # inside the actor: the GPU Ray gave it, or none
        source = replace(self.pair_source(pair_id), device=device)
        hold = None
        if os.environ.get(HOLD_CHUNK_ENV) == task.name:
            hold = str(ctx.checkpoint_dir / f".held-{task.name}")
        call = ActorCall(f"{ctx.job_id}:{task.name}:{uuid.uuid4().hex[:8]}", hold, oom_limit())
        for attempt in range(self.retries + 1):
            actor = self.actor(source)
            ref = actor.run.remote(task, call)
            try:
                while not self.ray.wait([ref], timeout=self.poll_seconds)[0]:
                    ctx.check_cancel()  # the job's cancellation point while the actor works
                result: ChunkResult = self.ray.get(ref)
            except RayActorError as e:
                self._actors.pop(actor_name(source), None)
                record = ctx.provenance.setdefault("executor", self.describe())
                record["lost_chunks"] = int(record.get("lost_chunks", 0)) + 1
                ctx.log(
                    f"ray actor of {pair_id} lost on chunk {task.name} (attempt {attempt + 1}): "
                    f"re-queued ({type(e).__name__})",
                    level="WARNING",
                )
                continue
            except BaseException:  # the job stops (cancel, lease lost, shutdown): so does its chunk
                self._stop(actor, call, ref)
                raise
            for halving in result.halvings:
                record_halving(ctx, halving)
            if result.compute:
                counts = ForwardCounts(**result.compute)
                ctx.provenance["compute"] = counts.add(ctx.provenance.get("compute", {}))
            return result.tables
        raise CrosspatchError(
            f"chunk {task.name} of {pair_id}: its Ray actor was lost {self.retries + 1} times"
        )

    def _stop(self, actor: ActorHandle, call: ActorCall, ref: ObjectRef) -> None:
        """Cancel `call`'s chunk in `actor` and wait (bounded) until it has left, so the actor is free."""
        try:
            actor.cancel.remote(call.token)
            self.ray.wait([ref], timeout=self.stop_seconds)
        except Exception as e:  # a lost actor or cluster: nothing left to stop
            log.warning("could not stop chunk %s in its actor: %s", call.token, e)

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
