"""Job handlers: `kind -> function(spec, context)`. Only kinds whose engine pieces exist are registered.

A handler streams its work in chunks of prompts; each finished chunk is a checkpoint part
(`events.00003`, `cells.00003`), so a job resumed after a crash skips the chunks it already has.
The engine is imported inside the handlers: importing this module stays cheap for the API process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app.schemas.jobs import JOB_SPEC_ADAPTER, CrosspatchSpec, DivergenceSpec
from app.worker.context import JobContext

Handler = Callable[[Any, JobContext], None]
HANDLERS: dict[str, Handler] = {}


def register(kind: str) -> Callable[[Handler], Handler]:
    """Register `fn` as the handler of `kind` (each kind once)."""

    def deco(fn: Handler) -> Handler:
        if kind in HANDLERS:
            raise ValueError(f"a handler for job kind {kind!r} is already registered")
        HANDLERS[kind] = fn
        return fn

    return deco


def available_kinds() -> list[str]:
    """The job kinds this installation can run."""
    return sorted(HANDLERS)


def run_job(spec: dict[str, Any], ctx: JobContext) -> None:
    """Validate `spec` and run its kind's handler."""
    parsed = JOB_SPEC_ADAPTER.validate_python(spec)
    handler = HANDLERS.get(parsed.kind)
    if handler is None:
        raise NotImplementedError(f"job kind {parsed.kind!r} is not available on this worker")
    handler(parsed, ctx)


def load_prompt_records(spec: DivergenceSpec) -> list[Any]:
    """The spec's prompts as engine `PromptRecord`s (inline, or the checked file)."""
    from engine.prompts import PromptRecord, load_prompts

    if spec.prompts is not None:
        return [PromptRecord(id=p.id, text=p.text, category=p.category) for p in spec.prompts]
    assert spec.prompt_file is not None
    return load_prompts(Path(spec.prompt_file))


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _events_for(pair: Any, chunk: Sequence[Any], spec: DivergenceSpec) -> list[Any]:
    from engine.divergence import find_divergences

    return find_divergences(pair, chunk, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size)


def _provenance(ctx: JobContext, pair: Any, spec: DivergenceSpec) -> None:
    ctx.provenance.update(
        pair=pair.pair_id,
        family=pair.family,
        models=pair.provenance(),
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        chunk_size=spec.chunk_size,
    )


@register("divergence")
def divergence(spec: DivergenceSpec, ctx: JobContext) -> None:
    """First divergence per prompt -> `events` parts."""
    from engine.results import events_table

    pair = ctx.load_pair(spec.pair_id)
    _provenance(ctx, pair, spec)
    prompts = load_prompt_records(spec)
    chunks = _chunks(prompts, spec.chunk_size)
    done = ctx.completed_parts()
    for i, chunk in enumerate(chunks):
        name = f"events.{i:05d}"
        if name not in done:
            ctx.check_cancel()
            ctx.write_part(name, events_table(_events_for(pair, chunk, spec), pair.family, pair.pair_id))
        ctx.progress((i + 1) / len(chunks), f"divergence: chunk {i + 1}/{len(chunks)}")
    ctx.log(f"divergence done: {len(prompts)} prompts in {len(chunks)} parts")


@register("crosspatch")
def crosspatch(spec: CrosspatchSpec, ctx: JobContext) -> None:
    """Divergence -> 2x2 cells per chunk (`events`/`cells` parts) -> `summaries` over all cells."""
    from engine.crosspatch import crosspatch as run_crosspatch
    from engine.results import events_table
    from engine.stats import summarize

    pair = ctx.load_pair(spec.pair_id)
    _provenance(ctx, pair, spec)
    boundaries = pair.resolve_boundaries(spec.boundary)
    ctx.provenance.update(
        boundaries=boundaries, readouts=spec.readouts, seed=spec.seed, n_resamples=spec.n_resamples
    )
    prompts = load_prompt_records(spec)
    chunks = _chunks(prompts, spec.chunk_size)
    done = ctx.completed_parts()
    skipped = 0
    for i, chunk in enumerate(chunks):
        ev_name, cell_name = f"events.{i:05d}", f"cells.{i:05d}"
        if ev_name in done and cell_name in done:
            skipped += 1
        else:
            ctx.check_cancel()
            events = _events_for(pair, chunk, spec)
            if ev_name not in done:
                ctx.write_part(ev_name, events_table(events, pair.family, pair.pair_id))
            ctx.check_cancel()
            cells = run_crosspatch(
                pair, events, boundary=boundaries, readouts=tuple(spec.readouts), batch_size=spec.batch_size
            )
            ctx.write_part(cell_name, cells)
        ctx.progress(0.95 * (i + 1) / len(chunks), f"crosspatch: chunk {i + 1}/{len(chunks)}")
    if skipped:
        ctx.log(f"resumed: skipped {skipped} finished chunk(s)")
    cells_all = ctx.read_parts("cells")
    if cells_all is not None and cells_all.num_rows:
        ctx.write_part("summaries.all", summarize(cells_all, n_resamples=spec.n_resamples, seed=spec.seed))
    ctx.progress(1.0, "crosspatch: done")
    ctx.log(f"crosspatch done: {len(prompts)} prompts, boundaries {boundaries}, readouts {spec.readouts}")
