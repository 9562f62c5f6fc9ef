"""Job handlers: `kind -> function(spec, context)`. Every kind of the spec union has one.

A handler streams its work in chunks of prompts; each finished chunk is a checkpoint part
(`events.00003`, `cells.00003`), so a job resumed after a crash skips the chunks it already has.
Only worker processes import this module (it imports the engine and torch; saes, which imports
sae_lens, only inside the handlers that need it); the API takes job kinds from the spec union
(`app.schemas.jobs.job_kinds`) and the job layout from `app.store.layout`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crosspatch.app.schemas.jobs import (
    JOB_SPEC_ADAPTER,
    ContinuationSpec,
    CrosspatchSpec,
    DescendantIn,
    DictionaryOptions,
    DivergenceSpec,
    ForcedTokensSpec,
    LineageSpec,
    LoadDictionarySpec,
    LoraControlSpec,
    MediationOptions,
    MediationSpec,
    PipelineSpec,
    TrainDictionarySpec,
)
from crosspatch.app.worker import staging
from crosspatch.app.worker.context import JobContext
from crosspatch.app.worker.executor import ChunkTask
from crosspatch.engine.divergence import DivergenceEvent, iter_divergences
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.handoff import HandoffConfig, feature_upstream_table, handoff_balanced
from crosspatch.engine.mediation import BranchView, MediationConfig, MediationResult
from crosspatch.engine.mediation import mediate as run_mediation
from crosspatch.engine.noop import noop_report
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.prompts import PromptRecord, load_prompts
from crosspatch.engine.results import GATE_CHECKS_SCHEMA, events_from_table, events_table
from crosspatch.engine.stats import summarize
from crosspatch.saes.errors import GateFailedError

if TYPE_CHECKING:  # saes imports sae_lens (seconds): its handlers import it when a job needs it
    from crosspatch.saes.load import Dictionary

Handler = Callable[[Any, JobContext], None]
HANDLERS: dict[str, Handler] = {}
_D = TypeVar("_D")


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
        return [
            PromptRecord(
                id=p.id,
                text=p.text,
                category=p.category,
                expected_answer=getattr(p, "expected_answer", None),
                answer_aliases=tuple(getattr(p, "answer_aliases", ())),
            )
            for p in spec.prompts
        ]
    assert spec.prompt_file is not None
    return load_prompts(Path(spec.prompt_file))


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _events_for(
    pair: ModelPair,
    chunk: Sequence[PromptRecord],
    spec: DivergenceSpec,
    on_batch: Callable[[int, int], None] | None = None,
    capture: Sequence[int] | None = None,
) -> list[DivergenceEvent]:
    """The chunk's first divergences, batch by batch (`on_batch`: the job's cancellation point).

    `capture`: boundaries whose inputs the decoding pass keeps for the fused 2x2 (first_diff events only).
    """
    event = getattr(spec, "event", "first_diff")
    batches = iter_divergences(
        pair,
        chunk,
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        chat_template=getattr(spec, "chat_template", False),
        event=event,
        on_batch=on_batch,
        capture=capture if event == "first_diff" else None,
    )
    return [e for batch in batches for e in batch]


def _chunk_task(
    spec: DivergenceSpec,
    chunk: Sequence[PromptRecord],
    name: str,
    boundaries: list[int] | None = None,
    check_noop: bool = False,
) -> ChunkTask:
    """One chunk of `spec` as an executor task (events only without boundaries)."""
    return ChunkTask(
        name=name,
        prompts=tuple(chunk),
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        chat_template=getattr(spec, "chat_template", False),
        event=getattr(spec, "event", "first_diff"),
        boundaries=None if boundaries is None else tuple(boundaries),
        readouts=tuple(getattr(spec, "readouts", ("pt", "it"))),
        check_noop=check_noop,
    )


def _provenance(ctx: JobContext, pair: staging.Pair, spec: DivergenceSpec) -> None:
    ctx.provenance.update(
        pair=pair.pair_id,
        family=pair.family,
        models=pair.provenance(),
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        chunk_size=getattr(spec, "chunk_size", None),
        chat_template=getattr(spec, "chat_template", False),
        event=getattr(spec, "event", "first_diff"),
    )


@register("divergence")
def divergence(spec: DivergenceSpec, ctx: JobContext) -> None:
    """First divergence per prompt -> `events` parts."""

    prompts = load_prompt_records(spec)
    pair = ctx.load_pair(spec.pair_id, workload=staging.workload_for(spec, prompts))
    _provenance(ctx, pair, spec)
    chunks = _chunks(prompts, spec.chunk_size)
    done = ctx.completed_parts()
    for i, chunk in enumerate(chunks):
        name = f"events.{i:05d}"
        if name not in done:
            ctx.check_cancel()
            tables = staging.run_chunk(ctx, pair, _chunk_task(spec, chunk, f"{i:05d}"))
            ctx.write_part(name, tables["events"])
        ctx.progress((i + 1) / len(chunks), f"divergence: chunk {i + 1}/{len(chunks)}")
    staging.record_models(ctx, pair)
    ctx.log(f"divergence done: {len(prompts)} prompts in {len(chunks)} parts")


def _record_noop(ctx: JobContext, pair: staging.Pair, stage: str, report: dict | None) -> bool:
    """Store a runtime no-op check in provenance (`noop_checks[pair][stage]`); True if there was one."""
    if report is None:
        return False
    ctx.provenance.setdefault("noop_checks", {}).setdefault(pair.pair_id, {})[stage] = report
    ctx.log(f"{pair.pair_id}: {stage} no-op check max |diff| {max(report['max_abs_diff'].values()):.1e}")
    return True


def _crosspatch_chunks(
    pair: staging.Pair,
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
            task = _chunk_task(spec, chunk, f"{tag}{i:05d}", boundaries, check_noop=not checked)
            tables = staging.run_chunk(ctx, pair, task)  # here (lockstep or staged) or in a Ray actor
            if ev_name not in done:
                ctx.write_part(ev_name, tables["events"])
            cells = tables["cells"]
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
            summarize(
                cells_all, n_resamples=spec.n_resamples, seed=spec.seed, position_min=(3, 5), by_category=True
            ),
        )


@register("crosspatch")
def crosspatch(spec: CrosspatchSpec, ctx: JobContext) -> None:
    """Divergence -> 2x2 cells per chunk (`events`/`cells` parts) -> `summaries` over all cells."""
    prompts = load_prompt_records(spec)
    workload = staging.workload_for(spec, prompts, spec.boundary) if staging.staged_ok(spec) else None
    pair = ctx.load_pair(spec.pair_id, workload=workload)
    _provenance(ctx, pair, spec)
    boundaries = pair.resolve_boundaries(spec.boundary)
    ctx.provenance.update(
        boundaries=boundaries,
        headline_boundary=pair.headline_boundary(spec.boundary),
        readouts=spec.readouts,
        seed=spec.seed,
        n_resamples=spec.n_resamples,
    )
    _crosspatch_chunks(pair, prompts, spec, ctx, boundaries)
    staging.record_models(ctx, pair)
    _summaries(ctx, spec)
    _controls(ctx, pair, spec, "", (0.95, 1.0))
    ctx.progress(1.0, "crosspatch: done")
    ctx.log(f"crosspatch done: {len(prompts)} prompts, boundaries {boundaries}, readouts {spec.readouts}")


def _dataclass_from(cls: type[_D], options: BaseModel, **extra: object) -> _D:
    """The engine dataclass `cls` from the API options of the same names (lists as tuples), plus `extra`."""
    names = {f.name for f in dataclasses.fields(cls)} & set(type(options).model_fields) - set(extra)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.model_dump(include=names).items()}
    return cls(**values, **extra)


def _mediation_config(options: MediationOptions, boundary: int | None, batch_size: int) -> MediationConfig:
    """The engine's MediationConfig from a job's mediation options."""
    handoff = HandoffConfig(alphas=tuple(options.handoff_alphas)) if options.handoff else None
    return _dataclass_from(
        MediationConfig, options, boundary=boundary, batch_size=batch_size, handoff=handoff
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
    _feature_page_parts(ctx, pair, events, dictionary, view, result, tag)
    ctx.write_part(f"feature_acts.{tag}all", result.feature_acts)
    ctx.write_part(f"feature_effects.{tag}all", result.effects)
    n_events = {(pair.pair_id, "fit"): len(result.fit_ids), (pair.pair_id, "test"): len(result.test_ids)}
    ctx.write_part(f"feature_upstream.{tag}all", feature_upstream_table(result.feature_acts, n_events))
    if result.handoff is not None:  # pair rows; the family / balanced rows come from _handoff_balanced
        ctx.provenance.setdefault("handoff", {})[pair.pair_id] = {
            "windows": result.handoff.windows,
            "boundary": result.handoff.boundary,
            "terminal": result.handoff.terminal,
            "alpha0_max_abs_diff": result.handoff.alpha0_max_abs_diff,
            "unavailable": result.handoff.unavailable,
        }
        ctx.write_part(f"handoff.{tag}all", result.handoff.table)


def _exclude_from_features(
    ctx: JobContext, pair: ModelPair, dictionary: Dictionary, tag: str, error: GateFailedError
) -> None:
    """A pipeline pair whose dictionary failed its gate: no mediation, its gate rows and the reason kept."""
    gate = dictionary.meta.get("gate") or {}
    ctx.log(f"{pair.pair_id}: excluded from feature claims: {error}", "WARNING")
    ctx.provenance.setdefault("excluded_from_features", {})[pair.pair_id] = str(error)
    ctx.provenance.setdefault("dictionaries", {}).setdefault(pair.pair_id, {}).update(
        id=dictionary.id, path=str(dictionary.path), gate=gate, metrics=dictionary.meta.get("metrics")
    )
    if gate.get("checks"):
        ctx.write_part(f"gate_checks.{tag}all", _gate_checks(pair, dictionary.id, gate))


def _handoff_balanced(ctx: JobContext) -> None:
    """Family and family-balanced handoff rows over every pair's rows (engine.stats conventions)."""
    table = ctx.read_parts("handoff")
    if table is not None and table.num_rows:
        pairs = table.filter(pc.equal(table["level"], "pair"))
        balanced = handoff_balanced(pairs)
        ctx.write_part("handoff.balanced", balanced.filter(pc.not_equal(balanced["level"], "pair")))


def _feature_page_parts(
    ctx: JobContext,
    pair: ModelPair,
    events: list[DivergenceEvent],
    dictionary: Dictionary,
    view: BranchView,
    result: MediationResult,
    tag: str,
) -> None:
    """What feature pages need (engine.feature_pages): decoded top events and decoder logit-lens tokens."""
    from crosspatch.engine import feature_pages as fp

    scores = fp.scores_by_key(result.ranking.keys, result.ranking.score)
    keys = fp.page_latents(result.feature_acts, scores)
    examples = fp.feature_examples_table(pair, events, result.feature_acts, keys)
    latents = [latent for d, latent in keys if d == view.id]
    tokens = fp.decoder_tokens_table(
        pair, view.id, view.layer, dictionary.W_dec, latents, branch=view.branch, architecture=dictionary.kind
    )
    ctx.write_part(f"feature_examples.{tag}all", examples)
    ctx.write_part(f"feature_decoder_tokens.{tag}all", tokens)


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
    ctx: JobContext | None = None,
) -> Dictionary:
    """Train (or reload) the pair's dictionary on the prompts outside the mediation test split; with `ctx`
    and its shared cache, a dictionary (and activation cache) any job computed from the same inputs is
    reused instead (`app.worker.shared_cache`)."""
    from crosspatch.saes.for_pair import train_for_pair
    from crosspatch.saes.quality import GateConfig

    mediation = mediation or MediationOptions()
    train = lambda: train_for_pair(  # noqa: E731
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
        balance_branches=opts.balance_branches,
    )
    if ctx is None or ctx.shared_cache is None:
        return train()
    material = _dictionary_key(ctx, pair, prompts, opts, role, events, mediation, max_new_tokens)
    return ctx.shared_cache.reuse_or_compute(ctx, "dictionary", material, out, train)


def _dictionary_key(
    ctx: JobContext,
    pair: ModelPair,
    prompts: Sequence[PromptRecord],
    opts: DictionaryOptions,
    role: str,
    events: Sequence[DivergenceEvent] | None,
    mediation: MediationOptions,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Everything a trained dictionary depends on: pair revision, prompt set, events, settings."""
    from crosspatch.app.services.cache import digest

    settings = {
        "role": role,
        "dtype": ctx.dtype,
        "dictionary": opts.model_dump(mode="json"),
        "fit_fraction": mediation.fit_fraction,
        "split_seed": mediation.split_seed,
        "max_new_tokens": max_new_tokens,
    }
    return {
        "pair_id": pair.pair_id,
        "pair": pair.provenance(),  # weights and tokenizer fingerprints: the pair's revision
        "prompts": digest([(p.id, p.text) for p in prompts]),
        "events": None
        if events is None
        else digest([(e.prompt_id, e.diverged, e.position, e.t_pt, e.t_it) for e in events]),
        "settings": settings,
    }


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
        ctx=ctx,
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
    if spec.mediation.handoff:
        _handoff_balanced(ctx)
    ctx.progress(1.0, "mediation: done")


@register("pipeline")
def pipeline(spec: PipelineSpec, ctx: JobContext) -> None:
    """Per pair: divergence -> 2x2 -> dictionary on the final MLP (default: paired PT/IT crosscoder) ->
    mediation; then summaries over all."""

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
            ctx=ctx,
        )
        _record_dictionary(ctx, dictionary, pair)
        ctx.check_cancel()
        ctx.progress(lo + 0.7 * span, f"{pair_id}: mediation")
        try:
            _mediate_pair(pair, events, dictionary, spec.mediation, headline, spec.batch_size, ctx, tag)
        except GateFailedError as e:  # method 5.1: a family whose dictionary fails the gate makes no
            _exclude_from_features(ctx, pair, dictionary, tag, e)  # feature claims; the job goes on
        _controls(ctx, pair, spec, tag, (lo + 0.9 * span, lo + span))
        ctx.progress(lo + span, f"{pair_id}: done")
        if spec.forced_tokens or spec.continuation:
            _forced_and_continuation(pair, prompts, events, spec, ctx, tag, headline)
    _summaries(ctx, spec)
    if spec.mediation.handoff:
        _handoff_balanced(ctx)
    if spec.forced_tokens:
        _forced_summaries(ctx, spec)
    if spec.continuation:
        _continuation_summaries(ctx, spec)
    ctx.progress(1.0, "pipeline: done")


def _part_tag(pair_id: str) -> str:
    """A pair id as a part-name tag (letters, digits, '-', '_')."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in pair_id)


# ---- forced-token scoring and constrained continuation (method §6) ----------------------------------
def _forced_and_continuation(
    pair: ModelPair,
    prompts: Sequence[PromptRecord],
    events: list[DivergenceEvent],
    spec: PipelineSpec,
    ctx: JobContext,
    tag: str,
    boundary: int,
) -> None:
    """Pipeline option: forced tokens / continuation on a pair's events (defaults of those job kinds)."""
    from crosspatch.engine.continuation import continuation_table
    from crosspatch.engine.forced import forced_table

    done = ctx.completed_parts()
    if spec.forced_tokens and f"forced_tokens.{tag}all" not in done:
        ctx.check_cancel()
        ctx.write_part(
            f"forced_tokens.{tag}all", forced_table(pair, events, prompts, batch_size=spec.batch_size)
        )
    if spec.continuation and f"continuation.{tag}all" not in done:
        ctx.check_cancel()
        table = continuation_table(
            pair, events, boundary=boundary, batch_size=spec.batch_size, seed=spec.seed
        )
        ctx.write_part(f"continuation.{tag}all", table)


def _forced_summaries(ctx: JobContext, spec: ForcedTokensSpec) -> None:
    from crosspatch.engine.forced import summarize_forced

    table = ctx.read_parts("forced_tokens")
    if table is not None and table.num_rows:
        ctx.write_part(
            "forced_summaries.all", summarize_forced(table, n_resamples=spec.n_resamples, seed=spec.seed)
        )


def _continuation_summaries(ctx: JobContext, spec: ContinuationSpec) -> None:
    from crosspatch.engine.continuation import summarize_continuation

    table = ctx.read_parts("continuation")
    if table is not None and table.num_rows:
        summary = summarize_continuation(table, n_resamples=spec.n_resamples, seed=spec.seed)
        ctx.write_part("continuation_summaries.all", summary)


# one chunk's table of a method-§6 job: run(pair, prompts of the chunk, their divergence events)
ChunkRun = Callable[[ModelPair, Sequence[PromptRecord], list[DivergenceEvent]], pa.Table]


def _method_chunks(
    spec: ForcedTokensSpec | ContinuationSpec, ctx: JobContext, table: str, run: ChunkRun
) -> ModelPair:
    """Divergence + `run(pair, chunk, events)` per chunk as `events.NNNNN` / `<table>.NNNNN` parts (resumable)."""
    from crosspatch.engine.results import events_from_table, events_table

    pair = ctx.load_pair(spec.pair_id)
    _provenance(ctx, pair, spec)
    prompts = load_prompt_records(spec)
    chunks = _chunks(prompts, spec.chunk_size)
    done = ctx.completed_parts()
    for i, chunk in enumerate(chunks):
        ev_name, name = f"events.{i:05d}", f"{table}.{i:05d}"
        if name not in done:
            ctx.check_cancel()
            if ev_name in done:
                events = events_from_table(ctx.read_parts("events", prefix=f"{i:05d}"))
            else:
                events = _events_for(pair, chunk, spec)
                ctx.write_part(ev_name, events_table(events, pair.family, pair.pair_id))
            ctx.check_cancel()
            ctx.write_part(name, run(pair, chunk, events))
        ctx.progress(0.95 * (i + 1) / len(chunks), f"{table}: chunk {i + 1}/{len(chunks)}")
    return pair


@register("forced_tokens")
def forced_tokens(spec: ForcedTokensSpec, ctx: JobContext) -> None:
    """Divergence -> forced-token continuations and scores per chunk -> per-category contrasts."""
    from crosspatch.engine.forced import forced_table

    ctx.provenance.update(branches=spec.branches, budgets=spec.budgets, n_resamples=spec.n_resamples)

    def run(pair: ModelPair, chunk: Sequence[PromptRecord], events: list[DivergenceEvent]) -> pa.Table:
        return forced_table(pair, events, chunk, tuple(spec.branches), spec.budgets, spec.batch_size)

    _method_chunks(spec, ctx, "forced_tokens", run)
    _forced_summaries(ctx, spec)
    ctx.progress(1.0, "forced_tokens: done")


@register("continuation")
def continuation(spec: ContinuationSpec, ctx: JobContext) -> None:
    """Divergence -> constrained continuation (C_N per N, variants) per chunk -> summaries."""
    from crosspatch.engine.continuation import continuation_table
    from crosspatch.engine.recipe import single_boundary

    def run(pair: ModelPair, chunk: Sequence[PromptRecord], events: list[DivergenceEvent]) -> pa.Table:
        b = single_boundary(pair, spec.boundary)
        ctx.provenance.update(boundary=b, ns=spec.ns, variants=spec.variants, readout=spec.readout)
        return continuation_table(
            pair, events, spec.ns, b, spec.readout, tuple(spec.variants), spec.batch_size, spec.seed
        )

    _method_chunks(spec, ctx, "continuation", run)
    _continuation_summaries(ctx, spec)
    ctx.progress(1.0, "continuation: done")


@register("lora_control")
def lora_control(spec: LoraControlSpec, ctx: JobContext) -> None:
    """Train (resuming from the job's checkpoint), merge and verify a LoRA control on the pair's PT; then,
    only if valid, the 2x2 of PT vs the control -> `lora_controls` (+ `events`/`cells`/`summaries`) parts."""
    import copy

    import pyarrow as pa

    from crosspatch.engine.lora import LoraControlConfig, control_crosspatch, control_row, train_lora_control
    from crosspatch.engine.results import LORA_CONTROL_SCHEMA, events_table

    pair = ctx.load_pair(spec.pair_id)
    _provenance(ctx, pair, spec)
    cfg = LoraControlConfig(**{**spec.lora.model_dump(), "targets": tuple(spec.lora.targets)})
    n_held = max(1, round(spec.heldout_fraction * len(spec.corpus)))
    train, held = spec.corpus[:-n_held], spec.corpus[-n_held:]
    if not train:
        raise ValueError("the corpus needs at least one training text besides the held-out share")

    def on_step(step: int, total: int, loss: float) -> None:
        ctx.check_cancel()
        if step % 10 == 0 or step == total:
            ctx.progress(0.8 * step / total, f"lora: step {step}/{total}, loss {loss:.4f}")

    base = copy.deepcopy(pair.pt)  # peft wraps and merges into its base: the warm pair stays untouched
    control = train_lora_control(base, pair.tokenizer, train, held, ctx.checkpoint_dir / "lora", cfg, on_step)
    del base
    control_id = f"{pair.pair_id}+lora"
    record, cells, events = control_crosspatch(
        control,
        pair.pt,
        pair.tokenizer,
        load_prompt_records(spec),
        boundary=spec.boundary,
        n_resamples=spec.n_resamples,
        seed=spec.seed,
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        pair_id=control_id,
    )
    ctx.provenance["lora_control"] = record
    if cells is not None:
        ctx.write_part("events.all", events_table(events, pair.family, control_id))
        ctx.write_part("cells.all", cells)
        _summaries(ctx, spec)
    else:
        ctx.log(
            f"control not valid (failed: {', '.join(record['failed_checks'])}): no 2x2 reported", "WARNING"
        )
    row = control_row(record, pair.family, control_id)
    ctx.write_part("lora_controls.all", pa.Table.from_pylist([row], schema=LORA_CONTROL_SCHEMA))
    ctx.progress(1.0, f"lora_control: {record['status']}")


# ---- controls of the 2x2 (method 4.3-4.7) ------------------------------------------------------------


def _controls(
    ctx: JobContext,
    pair: ModelPair,
    spec: CrosspatchSpec | PipelineSpec,
    tag: str,
    progress: tuple[float, float],
) -> None:
    """The spec's `controls` on this pair's events at its headline boundary, first readout: parts
    `<table>.<tag><control>` (resumable per control); report lines in the log."""
    if not spec.controls:
        return
    import pyarrow as pa

    from crosspatch.engine.control_suite import CONTROL_TABLES, ControlOptions, format_controls, run_controls
    from crosspatch.engine.results import events_from_table

    events_tbl = ctx.read_parts("events", prefix=tag)
    events = events_from_table(events_tbl) if events_tbl is not None else []
    boundary, readout = pair.headline_boundary(spec.boundary), spec.readouts[0]
    o = spec.control_options
    options = _dataclass_from(
        ControlOptions, o, n_resamples=spec.n_resamples, seed=spec.seed, batch_size=spec.batch_size
    )
    record = ctx.provenance.setdefault("controls", {}).setdefault(pair.pair_id, {})
    record.update(controls=list(spec.controls), boundary=boundary, readout=readout, options=o.model_dump())
    if not any(e.diverged for e in events):
        ctx.log(f"{pair.pair_id}: no diverged events, controls skipped", "WARNING")
        return
    cells = ctx.read_parts("cells", prefix=tag)
    lo, hi = progress
    tables: dict[str, pa.Table] = {}
    for i, control in enumerate(spec.controls):
        names = {t: f"{t}.{tag}{control}" for t in CONTROL_TABLES[control]}
        done = ctx.completed_parts()
        ctx.check_cancel()
        if all(n in done for n in names.values()):
            ctx.log(f"resumed: control {control} of {pair.pair_id} already done")
        else:
            second = _wrong_descendant(ctx, pair, o.wrong_descendant) if control == "closure" else None
            run = run_controls(pair, events, [control], boundary, readout, options, cells, ctx.log, second)
            if run.noop:
                record.setdefault("native_history_noop", {}).update(run.noop)
            for table, name in names.items():
                ctx.write_part(name, run.tables[table])
        for table in names:
            part = ctx.read_parts(table, prefix=f"{tag}{control}")
            if part is not None:
                tables[table] = pa.concat_tables([tables[table], part]) if table in tables else part
        ctx.progress(lo + (hi - lo) * (i + 1) / len(spec.controls), f"{pair.pair_id}: control {control}")
    for line in format_controls(tables).splitlines():
        ctx.log(line)


def _wrong_descendant(ctx: JobContext, pair: ModelPair, ref: DescendantIn | None) -> ModelPair | None:
    """Closure's second descendant as a pair with `pair`'s PT (None when the job gives none)."""
    if ref is None:
        return None
    from crosspatch.engine.pairs import weights_fingerprint

    model, tok = _stage_model(ctx, ref, weights_fingerprint(pair.pt))
    return ModelPair.from_models(
        pair.pt, model, pair.tokenizer, tok or pair.tokenizer, family=pair.family,
        pair_id=f"{pair.pair_id}~{ref.pair_id or 'wrong_descendant'}",
    )  # fmt: skip


def _stage_model(
    ctx: JobContext, stage: DescendantIn, base_fingerprint: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model, tokenizer) of one lineage stage: a registered pair's IT (same base required) or a path."""
    from crosspatch.engine.pairs import load_model, weights_fingerprint

    if stage.pair_id is not None:
        pair = ctx.load_pair(stage.pair_id)
        if weights_fingerprint(pair.pt) != base_fingerprint:
            raise CrosspatchError(
                f"{stage.label()}: pair {stage.pair_id!r} has another base (PT) than the support pair; "
                "a descendant must share the pair's base"
            )
        return pair.it, pair.it_tokenizer
    from crosspatch.app.config import get_settings
    from crosspatch.app.services.paths import model_ref_to_open

    path = model_ref_to_open(stage.path, get_settings().model_roots, stage.label())  # checked at open
    return load_model(path, device=ctx.device, dtype=ctx.dtype)


@register("lineage")
def lineage(spec: LineageSpec, ctx: JobContext) -> None:
    """Fixed-support lineage sweep: support pair's events -> each stage's 2x2 vs the base -> one row per
    stage (`lineage`), per-event cells (`lineage_cells`), contrasts (`recipe_contrasts`), `events`."""
    from crosspatch.engine.pairs import weights_fingerprint
    from crosspatch.engine.recipe import contrast_table, lineage_sweep, single_boundary, summarize_lineage
    from crosspatch.engine.results import events_from_table, events_table

    support = ctx.load_pair(spec.pair_id)
    _provenance(ctx, support, spec)
    boundary = single_boundary(support, spec.boundary)
    base, tokenizer, family = support.pt, support.tokenizer, support.family
    base_fp = weights_fingerprint(base)
    done = ctx.completed_parts()
    if "events.all" in done:  # resumed: the same support as before
        events = events_from_table(ctx.read_parts("events"))
    else:
        events = _events_for(support, load_prompt_records(spec), spec)
        ctx.write_part("events.all", events_table(events, family, support.pair_id))
    if not any(e.diverged for e in events):
        raise CrosspatchError(f"no prompt diverged on the support pair {support.pair_id!r}: nothing to sweep")
    ctx.progress(0.2, f"{support.pair_id}: {sum(e.diverged for e in events)} events on the support")
    done = ctx.completed_parts()
    for i, stage in enumerate(spec.stages):  # one stage in memory at a time; a part per stage (resumable)
        name = f"lineage_cells.{i:05d}"
        if name not in done:
            ctx.check_cancel()
            model, tok = _stage_model(ctx, stage, base_fp)
            part = lineage_sweep(
                base,
                {stage.name: model},
                tokenizer,
                events,
                boundary,
                spec.readout,
                base_id=support.pair_id,
                stage_tokenizers={stage.name: tok or tokenizer},
                batch_size=spec.batch_size,
                family=family,
            )
            ctx.write_part(name, part)
            del model
        ctx.progress(0.2 + 0.7 * (i + 1) / len(spec.stages), f"lineage: stage {stage.name} scored")
    cells = ctx.read_parts("lineage_cells")
    ctx.provenance.update(
        boundary=boundary,
        readout=spec.readout,
        stages=[s.model_dump() for s in spec.stages],
        reference=spec.reference or spec.stages[-1].name,
    )
    rows = summarize_lineage(cells, spec.reference, spec.n_resamples, spec.n_permutations, spec.seed)
    ctx.write_part("lineage.all", rows)
    if spec.contrasts:
        ctx.write_part(
            "recipe_contrasts.all",
            contrast_table(cells, spec.contrasts, spec.n_resamples, spec.n_permutations, spec.seed),
        )
    for r in rows.to_pylist():
        ctx.log(
            f"lineage {r['stage']}: interaction {r['interaction']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
            f" share of {spec.reference or spec.stages[-1].name} {r['share_of_reference']:.1%}"
            f" portable share {r['portable_share']:.2f}"
        )
    ctx.progress(1.0, "lineage: done")
