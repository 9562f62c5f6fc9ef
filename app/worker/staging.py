"""Memory-aware execution for divergence and crosspatch jobs: admission workload, staged pairs, OOM halving.

`workload_for` sizes a job for the worker's admission (engine.admission) before any weight loads; the
chunk runners dispatch to lockstep (`ModelPair`) or staged (`StagedPair`) execution and redo a chunk at half
the batch on out-of-memory (`CROSSPATCH_FAULT_OOM_ABOVE_BATCH` simulates one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from crosspatch.app.worker.context import JobContext
from crosspatch.app.worker.executor import ChunkTask
from crosspatch.engine.admission import Workload, run_halving
from crosspatch.engine.crosspatch import crosspatch as run_crosspatch
from crosspatch.engine.divergence import DivergenceEvent, iter_divergences
from crosspatch.engine.prompts import PromptRecord
from crosspatch.engine.results import events_table
from crosspatch.engine.staged import StagedPair, StateStore, staged_crosspatch, staged_divergences

CHAT_TEMPLATE_TOKENS = 64  # room for a chat template's own tokens (upper bound, IT-only studies)


def workload_for(spec: Any, prompts: Sequence[PromptRecord], boundary: Any = None) -> Workload:
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


def _points(ctx: JobContext, batch_size: int) -> Callable[[int, int], None]:
    """The engine's per-batch callback: the OOM fault hook, then the job's cancellation point."""

    def on_batch(done: int, total: int) -> None:
        ctx.oom_point(batch_size)
        ctx.cancel_point(done, total)

    return on_batch


def _halved(ctx: JobContext, what: str) -> Callable[[int, BaseException], None]:
    def on_halve(batch_size: int, error: BaseException) -> None:
        ctx.log(
            f"{what}: out of memory ({error}); redoing the chunk at batch size {batch_size}", level="WARNING"
        )
        ctx.provenance.setdefault("oom_halvings", []).append({"stage": what, "batch_size": batch_size})

    return on_halve


def events_for(
    pair: Any,
    chunk: Sequence[PromptRecord],
    spec: Any,
    ctx: JobContext,
    capture: Sequence[int] | None = None,
) -> list[DivergenceEvent]:
    """The chunk's first divergences (lockstep or staged), halving the batch on out-of-memory.

    `capture`: boundaries whose inputs a lockstep decode keeps for the fused 2x2 (first_diff events only).
    """

    def run(batch_size: int) -> list[DivergenceEvent]:
        kwargs = dict(
            max_new_tokens=spec.max_new_tokens,
            batch_size=batch_size,
            chat_template=getattr(spec, "chat_template", False),
            event=getattr(spec, "event", "first_diff"),
            on_batch=_points(ctx, batch_size),
        )
        if isinstance(pair, StagedPair):
            return staged_divergences(pair, chunk, **kwargs)
        fused = capture if kwargs["event"] == "first_diff" else None
        return [e for batch in iter_divergences(pair, chunk, capture=fused, **kwargs) for e in batch]

    return run_halving(run, spec.batch_size, _halved(ctx, "divergence"))


def cells_for(
    pair: Any,
    events: Sequence[DivergenceEvent],
    spec: Any,
    ctx: JobContext,
    boundaries: list[int],
    check_noop: bool,
) -> pa.Table:
    """The chunk's 2x2 cells (lockstep or staged), halving the batch on out-of-memory."""

    def run(batch_size: int) -> pa.Table:
        kwargs = dict(
            boundary=boundaries,
            readouts=tuple(spec.readouts),
            batch_size=batch_size,
            check_noop=check_noop,
            on_batch=_points(ctx, batch_size),
        )
        if isinstance(pair, StagedPair):
            with StateStore(max_bytes=ctx.staged_state_bytes) as store:
                return staged_crosspatch(pair, events, store=store, **kwargs)
        return run_crosspatch(pair, events, **kwargs)

    return run_halving(run, spec.batch_size, _halved(ctx, "crosspatch"))


def run_chunk(ctx: JobContext, pair: Any, task: ChunkTask) -> dict[str, pa.Table]:
    """A chunk's `events` (and with boundaries `cells`) tables.

    A staged pair, or the local executor: computed here, halving the batch on out-of-memory. A resident
    pair with the Ray executor: the same chunk in the pair's warm actor (`executor.run_chunk`).
    """
    if ctx.executor.kind != "local" and not isinstance(pair, StagedPair):
        return ctx.executor.run_chunk(ctx, pair.pair_id, task)
    events = events_for(pair, task.prompts, task, ctx, capture=task.boundaries)  # fused 2x2 when lockstep
    out = {"events": events_table(events, pair.family, pair.pair_id)}
    if task.boundaries is not None:
        ctx.check_cancel()
        out["cells"] = cells_for(pair, events, task, ctx, list(task.boundaries), task.check_noop)
    return out


def staged_ok(spec: Any) -> bool:
    """Whether a job may run staged: first-divergence events and no controls (those need both models)."""
    return getattr(spec, "event", "first_diff") == "first_diff" and not getattr(spec, "controls", None)


def record_models(ctx: JobContext, pair: Any) -> None:
    """A staged pair's weight hashes, taken as each model first loaded (a `ModelPair`'s are already in)."""
    if isinstance(pair, StagedPair):
        ctx.provenance["models"] = pair.provenance()
