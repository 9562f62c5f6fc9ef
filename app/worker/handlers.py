"""Job handlers: `kind -> function(spec, context)`. Every kind of the spec union has one.

A handler streams its work in chunks of prompts; each finished chunk is a checkpoint part
(`events.00003`, `cells.00003`), so a job resumed after a crash skips the chunks it already has.
Only worker processes import this module (it imports the engine and torch; saes, which imports
sae_lens, only inside the handlers that need it); the API takes job kinds from the spec union
(`app.schemas.jobs.job_kinds`) and the job layout from `app.store.layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from crosspatch.app.schemas.jobs import (
    JOB_SPEC_ADAPTER,
    CrosspatchSpec,
    DictionaryOptions,
    DivergenceSpec,
    LoadDictionarySpec,
    MediationOptions,
    MediationSpec,
    PipelineSpec,
    TrainDictionarySpec,
)
from crosspatch.app.worker.context import JobContext
from crosspatch.engine.crosspatch import crosspatch as run_crosspatch
from crosspatch.engine.divergence import DivergenceEvent, find_divergences
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.mediation import BranchView, MediationConfig
from crosspatch.engine.mediation import mediate as run_mediation
from crosspatch.engine.noop import noop_report
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.prompts import PromptRecord, load_prompts
from crosspatch.engine.results import GATE_CHECKS_SCHEMA, events_from_table, events_table
from crosspatch.engine.stats import summarize

if TYPE_CHECKING:  # saes imports sae_lens (seconds): its handlers import it when a job needs it
    from crosspatch.saes.load import Dictionary

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


def run_job(spec: dict[str, Any], ctx: JobContext) -> None:
    """Validate `spec` and run its kind's handler."""
    parsed = JOB_SPEC_ADAPTER.validate_python(spec)
    handler = HANDLERS.get(parsed.kind)
    if handler is None:
        raise CrosspatchError(f"job kind {parsed.kind!r} is not available on this worker")
    handler(parsed, ctx)


def load_prompt_records(spec: DivergenceSpec) -> list[PromptRecord]:
    """The spec's prompts as engine `PromptRecord`s (inline, or the checked file)."""

    if spec.prompts is not None:
        return [PromptRecord(id=p.id, text=p.text, category=p.category) for p in spec.prompts]
    assert spec.prompt_file is not None
    return load_prompts(Path(spec.prompt_file))


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _events_for(
    pair: ModelPair, chunk: Sequence[PromptRecord], spec: DivergenceSpec
) -> list[DivergenceEvent]:

    return find_divergences(
        pair,
        chunk,
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        chat_template=getattr(spec, "chat_template", False),
    )


def _provenance(ctx: JobContext, pair: ModelPair, spec: DivergenceSpec) -> None:
    ctx.provenance.update(
        pair=pair.pair_id,
        family=pair.family,
        models=pair.provenance(),
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        chunk_size=getattr(spec, "chunk_size", None),
        chat_template=getattr(spec, "chat_template", False),
    )


@register("divergence")
def divergence(spec: DivergenceSpec, ctx: JobContext) -> None:
    """First divergence per prompt -> `events` parts."""

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


def _record_noop(ctx: JobContext, pair: ModelPair, stage: str, report: dict | None) -> bool:
    """Store a runtime no-op check in provenance (`noop_checks[pair][stage]`); True if there was one."""
    if report is None:
        return False
    ctx.provenance.setdefault("noop_checks", {}).setdefault(pair.pair_id, {})[stage] = report
    ctx.log(f"{pair.pair_id}: {stage} no-op check max |diff| {max(report['max_abs_diff'].values()):.1e}")
    return True


def _crosspatch_chunks(
    pair: ModelPair,
    prompts: Sequence[PromptRecord],
    spec: CrosspatchSpec | PipelineSpec,
    ctx: JobContext,
    boundaries: list[int],
    tag: str = "",
    progress: tuple[float, float] = (0.0, 0.95),
) -> None:
    """Divergence + 2x2 per chunk of prompts as `events.<tag>NNNNN` / `cells.<tag>NNNNN` parts (resumable)."""

    chunks = _chunks(prompts, spec.chunk_size)
    done = ctx.completed_parts()
    skipped = 0
    checked = False  # the first batch this run scores is no-op checked (NoopCheckError fails the job)
    lo, hi = progress
    for i, chunk in enumerate(chunks):
        ev_name, cell_name = f"events.{tag}{i:05d}", f"cells.{tag}{i:05d}"
        if ev_name in done and cell_name in done:
            skipped += 1
        else:
            ctx.check_cancel()
            events = _events_for(pair, chunk, spec)
            if ev_name not in done:
                ctx.write_part(ev_name, events_table(events, pair.family, pair.pair_id))
            ctx.check_cancel()
            cells = run_crosspatch(
                pair,
                events,
                boundary=boundaries,
                readouts=tuple(spec.readouts),
                batch_size=spec.batch_size,
                check_noop=not checked,
            )
            checked = checked or _record_noop(ctx, pair, "cells", noop_report(cells))
            ctx.write_part(cell_name, cells)
        ctx.progress(
            lo + (hi - lo) * (i + 1) / len(chunks), f"{pair.pair_id}: 2x2 chunk {i + 1}/{len(chunks)}"
        )
    if skipped:
        ctx.log(f"resumed: skipped {skipped} finished chunk(s) of {pair.pair_id}")


def _summaries(ctx: JobContext, spec: CrosspatchSpec | PipelineSpec) -> None:

    cells_all = ctx.read_parts("cells")
    if cells_all is not None and cells_all.num_rows:
        ctx.write_part(
            "summaries.all",
            summarize(cells_all, n_resamples=spec.n_resamples, seed=spec.seed, position_min=(3, 5)),
        )


@register("crosspatch")
def crosspatch(spec: CrosspatchSpec, ctx: JobContext) -> None:
    """Divergence -> 2x2 cells per chunk (`events`/`cells` parts) -> `summaries` over all cells."""
    pair = ctx.load_pair(spec.pair_id)
    _provenance(ctx, pair, spec)
    boundaries = pair.resolve_boundaries(spec.boundary)
    ctx.provenance.update(
        boundaries=boundaries,
        headline_boundary=pair.headline_boundary(spec.boundary),
        readouts=spec.readouts,
        seed=spec.seed,
        n_resamples=spec.n_resamples,
    )
    prompts = load_prompt_records(spec)
    _crosspatch_chunks(pair, prompts, spec, ctx, boundaries)
    _summaries(ctx, spec)
    ctx.progress(1.0, "crosspatch: done")
    ctx.log(f"crosspatch done: {len(prompts)} prompts, boundaries {boundaries}, readouts {spec.readouts}")


def _mediation_config(options: MediationOptions, boundary: int | None, batch_size: int) -> MediationConfig:

    return MediationConfig(
        top_k=options.top_k,
        ks=tuple(options.ks),
        ablation=options.ablation,
        fit_fraction=options.fit_fraction,
        split_seed=options.split_seed,
        n_random_seeds=options.n_random_seeds,
        neighbours=options.neighbours,
        boundary=boundary,
        batch_size=batch_size,
        allow_failed_gate=options.allow_failed_gate,
    )


def _mediate_pair(
    pair: ModelPair,
    events: list[DivergenceEvent],
    dictionary: Dictionary,
    options: MediationOptions,
    boundary: int | None,
    batch_size: int,
    ctx: JobContext,
    tag: str,
) -> None:
    """Gate check, then mediation -> `feature_effects.<tag>all` / `feature_acts.<tag>all` parts."""
    from crosspatch.saes.quality import record_causal_checks, require_gate

    done = ctx.completed_parts()
    if f"feature_effects.{tag}all" in done and f"feature_acts.{tag}all" in done:
        ctx.log(f"resumed: mediation of {pair.pair_id} already done")
        return
    gate = require_gate(dictionary, override=options.allow_failed_gate, reason=f"job {ctx.job_id}")
    ctx.provenance.setdefault("dictionaries", {}).setdefault(pair.pair_id, {}).update(
        id=dictionary.id,
        path=str(dictionary.path),
        gate=gate,  # status, every check by name, and the override record when overridden
        metrics=dictionary.meta.get("metrics"),
    )
    if gate["overridden"]:
        ctx.log(
            f"dictionary {dictionary.id} is below the quality gate ({gate['gate_status']}); used by override",
            "WARNING",
        )
    cfg = _mediation_config(options, boundary, batch_size)
    view = BranchView(dictionary, "it")
    result = run_mediation(pair, events, [view], cfg, on_progress=ctx.log)
    _record_noop(ctx, pair, "mediation", result.noop)
    ctx.provenance.setdefault("mediation_splits", {})[pair.pair_id] = {
        "fit": result.fit_ids,
        "test": result.test_ids,
        "config": result.config,
        "k_labels": result.k_labels,
        "controls": result.controls,
        "dictionary_checks": result.dictionary_checks,  # gate / override, no test prompt trained it
    }
    # the causal checks complete the dictionary's gate for this job (kept in provenance and DuckDB; the
    # dictionary's files are not rewritten by a worker)
    full_gate = record_causal_checks(dictionary, result.checks, source=f"job {ctx.job_id}", save=False)
    ctx.provenance["dictionaries"][pair.pair_id]["gate_after_mediation"] = full_gate
    ctx.write_part(f"gate_checks.{tag}all", _gate_checks(pair, view.id, full_gate))
    ctx.write_part(f"feature_acts.{tag}all", result.feature_acts)
    ctx.write_part(f"feature_effects.{tag}all", result.effects)


def _gate_checks(pair: ModelPair, dictionary_id: str, gate: dict) -> pa.Table:
    """The job's gate_checks rows: every named check of the dictionary's gate, causal ones included."""

    rows = [
        {
            "family": pair.family,
            "pair_id": pair.pair_id,
            "dictionary_id": dictionary_id,
            "check_name": c["name"],
            "value": c.get("value") if isinstance(c.get("value"), int | float) else None,
            "threshold": None,
            "passed": c["status"] in ("passed", "not_applicable"),
            "detail": f"{c['status']} ({c['threshold']}): {c.get('detail') or ''}",
        }
        for c in gate["checks"]
    ]
    return pa.Table.from_pylist(rows, schema=GATE_CHECKS_SCHEMA)


def _train(
    pair: ModelPair,
    prompts: Sequence[PromptRecord],
    opts: DictionaryOptions,
    role: str,
    out: Path,
    *,
    events: Sequence[DivergenceEvent] | None = None,
    mediation: MediationOptions | None = None,
    max_new_tokens: int = 32,
) -> Dictionary:
    """Train (or reload) the pair's dictionary on the prompts outside the mediation test split."""
    from crosspatch.saes.for_pair import train_for_pair
    from crosspatch.saes.quality import GateConfig

    mediation = mediation or MediationOptions()
    return train_for_pair(
        pair,
        prompts,
        out,
        architecture=opts.architecture,
        role=role,
        layer=opts.layer,
        width=opts.width,
        k=opts.k,
        training_tokens=opts.training_tokens,
        continuation_tokens=opts.continuation_tokens,
        batch_size=opts.batch_size,
        lr=opts.lr,
        seed=opts.seed,
        training_prompts=opts.training_prompts,
        events=events,
        fit_fraction=mediation.fit_fraction,
        split_seed=mediation.split_seed,
        max_new_tokens=max_new_tokens,
        gate=GateConfig(
            min_heldout_tokens=opts.min_heldout_tokens, alive_range=(0.01, opts.max_alive_fraction)
        ),
    )


def _record_dictionary(ctx: JobContext, dictionary: Dictionary, pair: ModelPair) -> None:
    """Register a job's dictionary and log its gate, check by check."""
    from crosspatch.saes.quality import describe_check

    ctx.register_dictionary(dictionary, pair)
    fve = (dictionary.meta.get("metrics") or {}).get("fve_min")
    gate = dictionary.meta.get("gate") or {}
    split = dictionary.training_split
    ids = dictionary.training_prompt_ids
    ctx.provenance.setdefault("dictionaries", {})[pair.pair_id] = {
        "id": dictionary.id,
        "path": str(dictionary.path),
        "gate": dictionary.gate_status,
        "gate_checks": gate.get("checks", []),  # every check by name; causal ones pending until mediation
        "gate_config": gate.get("config"),
        "metrics": dictionary.meta.get("metrics"),
        "training_prompt_ids": None if ids is None else sorted(ids),
        "training_split": split,
    }
    ctx.log(f"{pair.pair_id}: dictionary {dictionary.id} (FVE {fve}) gate {dictionary.gate_status}")
    for c in gate.get("checks", []):
        ctx.log(f"{pair.pair_id}: gate check {describe_check(c)}")


@register("train_dictionary")
def train_dictionary(spec: TrainDictionarySpec, ctx: JobContext) -> None:
    """Cache the pair's MLP activations on the prompts + continuations, train, gate, register."""
    pair = ctx.load_pair(spec.pair_id)
    ctx.provenance.update(pair=pair.pair_id, family=pair.family, models=pair.provenance())
    ctx.progress(0.05, f"{pair.pair_id}: training dictionary ({spec.dictionary.architecture})")
    role = {"IT": "it", "PT": "pt", "paired": "paired"}[spec.model_role]
    dictionary = _train(
        pair,
        load_prompt_records(spec),
        spec.dictionary,
        role,
        ctx.checkpoint_dir / "dictionary",
        mediation=MediationOptions(fit_fraction=spec.fit_fraction, split_seed=spec.split_seed),
        max_new_tokens=spec.max_new_tokens,
    )
    _record_dictionary(ctx, dictionary, pair)
    ctx.progress(1.0, "train_dictionary: done")


@register("load_dictionary")
def load_dictionary_job(spec: LoadDictionarySpec, ctx: JobContext) -> None:
    """Load a dictionary (an allowed path, or a pretrained sae_lens id from the local HF cache, saved into
    the job's directory so later jobs load it by path), check it fits the pair, register it."""
    from crosspatch.saes.load import load_dictionary, load_pretrained

    pair = ctx.load_pair(spec.pair_id)
    if spec.source == "sae_lens":
        dictionary = load_pretrained(str(spec.release), str(spec.sae_id), device=ctx.device)
        dictionary.save(ctx.checkpoint_dir / "pretrained")
    else:
        dictionary = load_dictionary(str(spec.path), device=ctx.device)
    if dictionary.d_in != pair.it_adapter.d_model:
        raise ValueError(
            f"dictionary d_in {dictionary.d_in} does not match the pair's d_model {pair.it_adapter.d_model}"
        )
    if dictionary.layer is None or not 0 <= dictionary.layer < pair.n_layers:
        raise ValueError(f"dictionary layer {dictionary.layer} is not a layer of {pair.pair_id!r}")
    dictionary.meta.setdefault("model_role", spec.model_role.lower())
    _record_dictionary(ctx, dictionary, pair)
    ctx.progress(1.0, "load_dictionary: done")


@register("mediation")
def mediation(spec: MediationSpec, ctx: JobContext) -> None:
    """Divergence on the spec's prompts, then mediation with a registered dictionary."""
    from crosspatch.saes.load import load_dictionary

    pair = ctx.load_pair(spec.pair_id)
    _provenance(ctx, pair, spec)
    path = ctx.dictionary_path(spec.dictionary_id)
    dictionary = load_dictionary(path, device=ctx.device)
    prompts = load_prompt_records(spec)
    events = _events_for(pair, prompts, spec)
    ctx.write_part("events.all", events_table(events, pair.family, pair.pair_id))
    ctx.progress(0.3, "divergence done")
    _mediate_pair(pair, events, dictionary, spec.mediation, spec.boundary, spec.batch_size, ctx, "")
    ctx.progress(1.0, "mediation: done")


@register("pipeline")
def pipeline(spec: PipelineSpec, ctx: JobContext) -> None:
    """Per pair: divergence -> 2x2 -> dictionary on IT's final MLP -> mediation; then summaries over all."""

    prompts = load_prompt_records(spec)
    n = len(spec.pair_ids)
    ctx.provenance.update(
        pairs={},
        seed=spec.seed,
        n_resamples=spec.n_resamples,
        readouts=spec.readouts,
        chat_template=spec.chat_template,
    )
    for i, pair_id in enumerate(spec.pair_ids):
        lo, span = i / n, 1 / n
        tag = f"{_part_tag(pair_id)}."
        pair = ctx.load_pair(pair_id)
        boundaries = pair.resolve_boundaries(spec.boundary)
        headline = pair.headline_boundary(spec.boundary)  # mediation runs here, never at boundaries[0]
        ctx.provenance["pairs"][pair_id] = {
            "family": pair.family,
            "models": pair.provenance(),
            "boundaries": boundaries,
            "headline_boundary": headline,
        }
        _crosspatch_chunks(pair, prompts, spec, ctx, boundaries, tag, (lo, lo + 0.4 * span))
        ctx.check_cancel()
        opts = spec.dictionary
        events_tbl = ctx.read_parts("events", prefix=tag)
        events = events_from_table(events_tbl) if events_tbl is not None else []
        ctx.progress(lo + 0.45 * span, f"{pair_id}: training dictionary ({opts.architecture})")
        dictionary = _train(
            pair,
            prompts,
            opts,
            "it",
            ctx.checkpoint_dir / f"dictionary-{tag.rstrip('.')}",
            events=events,  # the events mediation tests below: their test split never trains it
            mediation=spec.mediation,
            max_new_tokens=spec.max_new_tokens,
        )
        _record_dictionary(ctx, dictionary, pair)
        ctx.check_cancel()
        ctx.progress(lo + 0.7 * span, f"{pair_id}: mediation")
        _mediate_pair(pair, events, dictionary, spec.mediation, headline, spec.batch_size, ctx, tag)
        ctx.progress(lo + span, f"{pair_id}: done")
    _summaries(ctx, spec)
    ctx.progress(1.0, "pipeline: done")


def _part_tag(pair_id: str) -> str:
    """A pair id as a part-name tag (letters, digits, '-', '_')."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in pair_id)
