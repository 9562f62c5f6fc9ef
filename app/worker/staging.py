"""Memory-aware execution of a job's chunks: admission workload, lockstep or staged pairs, OOM halving.

`workload_for` sizes a job for the worker's admission (engine.admission) before any weight loads.
`chunk_tables` is the one chunk function (divergence events, then the 2x2 cells), run in the worker process
and in a Ray pair actor alike: it dispatches to lockstep (`ModelPair`) or staged (`StagedPair`) execution
and redoes a step at half the batch on out-of-memory (`engine.admission.run_halving`). Where it runs reports
through `ChunkHooks`: the engine's per-batch callback (cancellation point, OOM fault hook) and each halving.
`run_chunk` is the handlers' entry: a Ray executor's actor, or here, with a chunk's residuals reused from
(or stored into) the shared cache (`app.worker.residual_cache`) and its forward calls counted in provenance
`compute` (engine.counting).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa

from crosspatch.app.worker.context import OOM_ABOVE_BATCH_ENV, JobContext
from crosspatch.app.worker.executor import ChunkTask
from crosspatch.engine.admission import Workload, run_halving
from crosspatch.engine.counting import count_forwards
from crosspatch.engine.crosspatch import crosspatch as run_crosspatch
from crosspatch.engine.divergence import DivergenceEvent, iter_divergences
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.prompts import PromptRecord
from crosspatch.engine.results import events_table
from crosspatch.engine.staged import StagedPair, StateStore, staged_divergences

if TYPE_CHECKING:
    from crosspatch.app.schemas.jobs import CrosspatchSpec, DivergenceSpec, PipelineSpec

CHAT_TEMPLATE_TOKENS = 64  # room for a chat template's own tokens (upper bound, IT-only studies)
Pair = ModelPair | StagedPair


def workload_for(
    spec: DivergenceSpec | CrosspatchSpec | PipelineSpec,
    prompts: Sequence[PromptRecord],
    boundary: int | float | str | Sequence[int] | None = None,
) -> Workload:
    """The job's admission workload; prompt tokens bounded by UTF-8 bytes + 2 (a token covers >= 1 byte)."""
    longest = max((len(p.text.encode()) for p in prompts), default=0) + 2
    if getattr(spec, "chat_template", False):
        longest += CHAT_TEMPLATE_TOKENS
    if boundary == "sweep":
        n_boundaries = -1  # every interior block: the worker resolves it from config.json
    elif isinstance(boundary, list | tuple):
        n_boundaries = len(boundary)
    else:
        n_boundaries = 1
    return Workload(spec.batch_size, longest, spec.max_new_tokens, n_boundaries)


def oom_point(batch_size: int, limit: int | None) -> None:
    """Fault hook: a simulated `torch.OutOfMemoryError` on a batch above `limit` (`OOM_ABOVE_BATCH_ENV`)."""
    if limit is not None and batch_size > limit:
        import torch

        raise torch.OutOfMemoryError(
            f"simulated out of memory at batch size {batch_size} ({OOM_ABOVE_BATCH_ENV})"
        )


def oom_limit() -> int | None:
    """This process's `OOM_ABOVE_BATCH_ENV` (None: no simulated out-of-memory)."""
    value = os.environ.get(OOM_ABOVE_BATCH_ENV)
    return None if value is None else int(value)


class ChunkHooks(Protocol):
    """Where a chunk run reports: per-batch callbacks, cancellation between steps, and OOM halvings."""

    def on_batch(self, batch_size: int) -> Callable[[int, int], None]:
        """The engine's `on_batch(done, total)` for a step running at `batch_size`."""
        ...

    def check_cancel(self) -> None: ...

    def on_halve(self, stage: str, batch_size: int, error: BaseException) -> None: ...


class JobHooks:
    """`ChunkHooks` of a chunk run in the worker process: the job context's cancel points and log."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx, self.limit = ctx, oom_limit()

    def on_batch(self, batch_size: int) -> Callable[[int, int], None]:
        def on_batch(done: int, total: int) -> None:
            oom_point(batch_size, self.limit)
            self.ctx.cancel_point(done, total)

        return on_batch

    def check_cancel(self) -> None:
        self.ctx.check_cancel()

    def on_halve(self, stage: str, batch_size: int, error: BaseException) -> None:
        record_halving(self.ctx, {"stage": stage, "batch_size": batch_size, "error": str(error)})


def record_halving(ctx: JobContext, halving: dict[str, int | str]) -> None:
    """Log one OOM halving and list it in provenance `oom_halvings` ({stage, batch_size})."""
    stage, size = halving["stage"], halving["batch_size"]
    ctx.log(f"{stage}: out of memory ({halving['error']}); redoing the chunk at batch size {size}", "WARNING")
    ctx.provenance.setdefault("oom_halvings", []).append({"stage": stage, "batch_size": size})


def chunk_events(pair: Pair, task: ChunkTask, hooks: ChunkHooks) -> list[DivergenceEvent]:
    """The chunk's first divergences (lockstep or staged), halving the batch on out-of-memory.

    A lockstep decode keeps the inputs of `task.boundaries` on its first_diff events (the fused 2x2).
    """

    def run(batch_size: int) -> list[DivergenceEvent]:
        kwargs = dict(
            max_new_tokens=task.max_new_tokens,
            batch_size=batch_size,
            chat_template=task.chat_template,
            event=task.event,
            on_batch=hooks.on_batch(batch_size),
        )
        if isinstance(pair, StagedPair):
            return staged_divergences(pair, list(task.prompts), **kwargs)
        fused = task.boundaries if task.event == "first_diff" else None
        batches = iter_divergences(pair, list(task.prompts), capture=fused, **kwargs)
        return [e for batch in batches for e in batch]

    return run_halving(run, task.batch_size, lambda b, e: hooks.on_halve("divergence", b, e))


def chunk_cells(
    pair: Pair,
    events: Sequence[DivergenceEvent],
    task: ChunkTask,
    hooks: ChunkHooks,
    state_bytes: int = 2 << 30,
) -> pa.Table:
    """The chunk's 2x2 cells (lockstep or staged), halving the batch on out-of-memory."""
    assert task.boundaries is not None

    def run(batch_size: int) -> pa.Table:
        kwargs = dict(
            boundary=list(task.boundaries or ()),
            readouts=task.readouts,
            batch_size=batch_size,
            check_noop=task.check_noop,
            on_batch=hooks.on_batch(batch_size),
        )
        with StateStore(max_bytes=state_bytes) as store:  # a staged pair's states between phases
            return run_crosspatch(pair, events, store=store, **kwargs)

    return run_halving(run, task.batch_size, lambda b, e: hooks.on_halve("crosspatch", b, e))


def chunk_tables(
    pair: Pair, task: ChunkTask, hooks: ChunkHooks, state_bytes: int = 2 << 30
) -> dict[str, pa.Table]:
    """A chunk's `events` (and with boundaries `cells`) tables: the one chunk function of every executor."""
    events = chunk_events(pair, task, hooks)
    out = {"events": events_table(events, pair.family, pair.pair_id)}
    if task.boundaries is not None:
        hooks.check_cancel()
        out["cells"] = chunk_cells(pair, events, task, hooks, state_bytes)
    return out


def run_chunk(ctx: JobContext, pair: Pair, task: ChunkTask) -> dict[str, pa.Table]:
    """A chunk's tables: in the pair's warm Ray actor (Ray executor, resident pair), else here.

    Here, a staged pair runs `chunk_tables`; a resident pair's 2x2 chunk goes through the shared cache of
    residuals when it is on, and its model / block forward calls add up in provenance `compute`.
    """
    from crosspatch.app.worker import residual_cache

    if ctx.executor.kind != "local" and isinstance(pair, ModelPair):
        return ctx.executor.run_chunk(ctx, pair.pair_id, task)
    hooks = JobHooks(ctx)
    if isinstance(pair, StagedPair):
        return chunk_tables(pair, task, hooks, ctx.staged_state_bytes)
    with count_forwards(pair) as counts:
        if residual_cache.applies(ctx, task):
            out = residual_cache.run(ctx, pair, task, hooks)
        else:
            out = chunk_tables(pair, task, hooks)
    ctx.provenance["compute"] = counts.add(ctx.provenance.get("compute", {}))
    return out


def staged_ok(spec: DivergenceSpec | CrosspatchSpec | PipelineSpec) -> bool:
    """Whether a job may run staged: first-divergence events and no controls (those need both models)."""
    return getattr(spec, "event", "first_diff") == "first_diff" and not getattr(spec, "controls", None)


def record_models(ctx: JobContext, pair: Pair) -> None:
    """A staged pair's weight hashes, taken as each model first loaded (a `ModelPair`'s are already in)."""
    if isinstance(pair, StagedPair):
        ctx.provenance["models"] = pair.provenance()
