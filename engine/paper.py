"""The paper recipe `paper-core5` (method §3.1, §3.3, §6, §7): its pairs, boundaries, stages and cost, as data.

`plan()` needs no network and no model files: the pairs and pinned revisions are the method's table
(§3.1, full SHAs from the paper's `src/poc/cross_model/config.py`), and the shapes behind the memory and time
estimates are the published `config.json` values of each checkpoint, hard-coded in `SHAPES` with their
source. Every estimate is arithmetic on those shapes under the stated assumptions (`Assumptions`), not a
measurement: bf16 weights, both models of a pair resident on one GPU (the 32B pair sharded, as the paper),
an H100-class GPU (989 TFLOP/s dense bf16, 3.35 TB/s HBM) at the stated utilisations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crosspatch.engine.admission import Estimate, Shape, Workload, choose_mode, estimate
from crosspatch.engine.errors import CrosspatchError
from crosspatch.engine.pairs import DEFAULT_BOUNDARY_FRACTION
from crosspatch.engine.prompts import PromptRecord

# Published config.json of each base checkpoint (the instruct checkpoint of a pair has the same shapes).
SHAPES: dict[str, Shape] = {
    "llama31_8b": Shape(
        32, 4096, 14336, 128256, 32, 8, 128, False, source="meta-llama/Llama-3.1-8B config.json"
    ),
    "qwen3_4b": Shape(36, 2560, 9728, 151936, 32, 8, 128, True, source="Qwen/Qwen3-4B-Base config.json"),
    "mistral_7b": Shape(
        32, 4096, 14336, 32768, 32, 8, 128, False, source="mistralai/Mistral-7B-v0.3 config.json"
    ),
    "olmo2_7b": Shape(
        32, 4096, 11008, 100352, 32, 32, 128, False, source="allenai/OLMo-2-1124-7B config.json"
    ),
    "qwen25_32b": Shape(
        64, 5120, 27648, 152064, 40, 8, 128, False, True, source="Qwen/Qwen2.5-32B config.json"
    ),
}


@dataclass(frozen=True)
class PaperPair:
    """One core-5 pair: hub ids, pinned revisions (method §3.1), and the late boundary of Table A.2."""

    family: str
    pt: str
    it: str
    pt_revision: str | None
    it_revision: str | None
    boundary: int

    @property
    def shape(self) -> Shape:
        return SHAPES[self.family]

    @property
    def pair_id(self) -> str:
        return self.family


CORE5: tuple[PaperPair, ...] = (
    PaperPair(
        "llama31_8b",
        "meta-llama/Llama-3.1-8B",
        "meta-llama/Llama-3.1-8B-Instruct",
        "d04e592bb4f6aa9cfee91e2e20afa771667e1d4b",
        "0e9e39f249a16976918f6564b8830bc894c89659",
        19,
    ),
    PaperPair(
        "qwen3_4b",
        "Qwen/Qwen3-4B-Base",
        "Qwen/Qwen3-4B",
        "906bfd4b4dc7f14ee4320094d8b41684abff8539",
        "1cfa9a7208912126459214e8b04321603b3df60c",
        22,
    ),
    PaperPair(
        "mistral_7b",
        "mistralai/Mistral-7B-v0.3",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "caa1feb0e54d415e2df31207e5f4e273e33509b1",
        "c170c708c41dac9275d15a8fff4eca08d52bab71",
        19,
    ),
    PaperPair(
        "olmo2_7b",
        "allenai/OLMo-2-1124-7B",
        "allenai/OLMo-2-1124-7B-Instruct",
        "7df9a82518afdecae4e8c026b27adccc8c1f0032",
        "470b1fba1ae01581f270116362ee4aa1b97f4c84",
        19,
    ),
    PaperPair(
        "qwen25_32b",
        "Qwen/Qwen2.5-32B",
        "Qwen/Qwen2.5-32B-Instruct",
        "1818d35814b8319459f4bd55ed1ac8709630f003",
        "5ede1c97bbab6ce5cda5812749b4c0bdf79b18dd",
        38,
    ),
)


@dataclass(frozen=True)
class Assumptions:
    """What the estimates assume (printed with the plan)."""

    n_prompts: int = 600  # the shipped holdout-600
    prompt_tokens: int = 120  # mean raw-prompt length (tokens)
    divergence_budget: int = 128  # lockstep greedy steps at most (method §8)
    mean_position: int = 16  # mean shared-prefix length at the first divergence
    batch_size: int = 16
    forced_branches: int = 4
    forced_budget: int = 128  # mean per-category budget on the holdout (GOV-FORMAT 96, others 128)
    continuation_max_n: int = 8
    continuation_variants: int = 3
    bytes_per_param: int = 2  # bf16
    peak_flops: float = 989e12  # H100 SXM dense bf16
    mfu: float = 0.25  # utilisation of batched full forwards (HF eager, short sequences)
    hbm_bytes_per_s: float = 3.35e12  # H100 SXM
    hbm_efficiency: float = 0.6  # share of peak bandwidth a decode step reaches
    step_overhead_s: float = 0.025  # per decode step and model: HF eager kernel launches (~30 ms/token at 8B)
    load_bytes_per_s: float = 1.5e9  # checkpoint read from local disk
    gpu_memory_gb: float = 80.0


@dataclass
class Stage:
    """One stage of the recipe for one pair: what it runs, peak GPU memory and wall time (estimates)."""

    name: str
    what: str
    memory_gb: float
    seconds: float


@dataclass
class PairPlan:
    pair: PaperPair
    n_params: int
    n_gpus: int
    stages: list[Stage] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


def _gb(n_bytes: float) -> float:
    return n_bytes / 1e9


def pair_plan(pair: PaperPair, a: Assumptions = Assumptions()) -> PairPlan:
    """Stages of one pair with memory (GB) and wall time (s) from its shapes and `a`."""
    s = pair.shape
    p = s.n_params
    weights = 2 * p * a.bytes_per_param  # PT + IT resident
    n_gpus = max(1, math.ceil(_gb(weights) * 1.25 / a.gpu_memory_gb))
    bw = a.hbm_bytes_per_s * n_gpus
    flops = a.peak_flops * a.mfu * n_gpus
    kv_per_token = 2 * s.n_layers * s.n_kv_heads * s.head_dim * a.bytes_per_param  # K and V, one model
    n_batches = math.ceil(a.n_prompts / a.batch_size)
    seq = a.prompt_tokens + a.mean_position
    # one decode step of one model: read its weights once, plus the eager per-step overhead
    step = p * a.bytes_per_param / (bw * a.hbm_efficiency) + a.step_overhead_s
    late = (s.n_layers - pair.boundary) / s.n_layers
    est = pair_estimate(pair, a)  # divergence + 2x2 peak, the worker's own estimator (engine.admission)
    resid = a.batch_size * seq * s.d_model * a.bytes_per_param
    stages = [
        Stage(
            "load",
            "load PT and IT in bf16 from local disk (download not counted)",
            _gb(weights),
            _gb(weights) * 1e9 / a.load_bytes_per_s,
        ),
        Stage(
            "divergence",
            f"lockstep greedy (KV cache, real-token mask, <= {a.divergence_budget} steps) on {a.n_prompts} prompts",
            _gb(est.lockstep),
            n_batches * (a.divergence_budget * 2 * step + 2 * 2 * p * a.batch_size * a.prompt_tokens / flops),
        ),
        Stage(
            "crosspatch",
            f"2x2 at b={pair.boundary} (2 full + 2 late-stack passes, no cache), bootstrap CIs per family",
            _gb(est.lockstep),
            a.n_prompts * seq * 2 * p * (2 + 2 * late) / flops,
        ),
        Stage(
            "controls",
            "off-manifold interpolation (5 alphas), selection baselines, commitment (the controls' job kinds)",
            _gb(weights + 8 * resid),
            a.n_prompts * seq * 2 * p * (5 * 2 * late + 4) / flops + n_batches * 32 * 2 * step,
        ),
        Stage(
            "forced_tokens",
            f"{a.forced_branches} forced branches per event, IT greedy <= {a.forced_budget} tokens, validators",
            _gb(weights + a.forced_branches * a.batch_size * (seq + a.forced_budget) * kv_per_token),
            n_batches * a.forced_budget * step,  # all branches of a batch decode together
        ),
        Stage(
            "continuation",
            f"C_N for N in 0,1,2,4,8 x {a.continuation_variants} variants, 4 cells, fp32 log-softmax",
            _gb(weights + a.batch_size * 2 * (a.continuation_max_n + 1) * s.vocab * 4 * 2),
            n_batches * 3 * a.continuation_max_n * step  # IT, PT and same-forced tails
            + a.continuation_variants
            * 2
            * a.n_prompts
            * (seq + a.continuation_max_n)
            * 2
            * p
            * (2 + 2 * late)
            / flops,
        ),
    ]
    return PairPlan(pair=pair, n_params=p, n_gpus=n_gpus, stages=stages)


def pair_estimate(pair: PaperPair, a: Assumptions = Assumptions()) -> Estimate:
    """The divergence + 2x2 peak of one pair at the recipe's batch and longest sequence (engine.admission)."""
    work = Workload(
        batch_size=a.batch_size,
        prompt_tokens=a.prompt_tokens,
        new_tokens=a.divergence_budget,
        n_boundaries=1,
        bytes_per_param=a.bytes_per_param,
    )
    return estimate(pair.shape, work)


def one_gpu_mode(pair: PaperPair, a: Assumptions = Assumptions()) -> str:
    """How a worker with one GPU of `a.gpu_memory_gb` runs the pair: lockstep, staged, or refused."""
    est = pair_estimate(pair, a)
    try:
        mode = choose_mode(est, int(a.gpu_memory_gb * 1e9))
    except CrosspatchError:
        mode = "refused"
    return f"one {a.gpu_memory_gb:.0f} GB GPU: {mode} ({est.describe()})"


def plan(a: Assumptions = Assumptions()) -> list[PairPlan]:
    """The core-5 recipe, pair by pair."""
    return [pair_plan(pair, a) for pair in CORE5]


def check_boundaries() -> None:
    """Every pinned boundary is the method's round(0.6 L) rule (Table A.2)."""
    for pair in CORE5:
        rule = round(DEFAULT_BOUNDARY_FRACTION * pair.shape.n_layers)
        if rule != pair.boundary:
            raise AssertionError(
                f"{pair.family}: boundary {pair.boundary} != round(0.6 x {pair.shape.n_layers})"
            )


def render(plans: list[PairPlan], a: Assumptions = Assumptions()) -> str:
    """The plan as plain text (what `crosspatch recipe paper-core5 --dry-run` prints)."""
    lines = [
        "paper-core5: the method's Core-5 study on the shipped holdout-600 (raw-shared prompts, common-IT readout)",
        f"prompts: engine/data/holdout_600.jsonl ({a.n_prompts}: GOV-CONV 300, GOV-FORMAT 150, SAFETY 150; MIT)",
        "",
        f"{'pair':<12} {'PT @ revision':<58} {'IT @ revision':<68} {'L':>3} {'b':>3} late",
    ]
    for pp in plans:
        p = pp.pair
        lines.append(
            f"{p.family:<12} {p.pt + ' @ ' + p.pt_revision[:7]:<58} {p.it + ' @ ' + p.it_revision[:7]:<68} "
            f"{p.shape.n_layers:>3} {p.boundary:>3} {p.boundary}-{p.shape.n_layers - 1}"
        )
    lines.append("")
    total = 0.0
    for pp in plans:
        p = pp.pair
        lines.append(
            f"{p.family}: {pp.n_params / 1e9:.2f}B params per model (shapes: {p.shape.source}), "
            f"{pp.n_gpus} GPU(s) of {a.gpu_memory_gb:.0f} GB"
        )
        lines.append(f"  {one_gpu_mode(p, a)}")
        for st in pp.stages:
            lines.append(f"  {st.name:<14} {st.memory_gb:7.1f} GB  {st.seconds / 60:7.1f} min  {st.what}")
        lines.append(f"  {'total':<14} {'':>10} {pp.seconds / 60:7.1f} min")
        total += pp.seconds * pp.n_gpus
    lines += [
        "",
        f"expected wall time, pairs one after another: {sum(pp.seconds for pp in plans) / 3600:.1f} h "
        f"({total / 3600:.1f} GPU-hours, H100-class)",
        "then: summaries per family and family-balanced (2000 bootstrap draws, seed 23), sign-flip null,",
        "      forced-token contrasts per category (GOV-FORMAT format criteria, SAFETY refusal; GOV-CONV unscored),",
        "      C_N by N with tail-only and the same-forced / shuffled-tail controls.",
        "assumptions (estimates, not measurements): " + ", ".join(f"{k}={v}" for k, v in asdict(a).items()),
        "memory = bf16 weights of both models + the stage's largest activations/KV cache at batch_size;",
        "time = decode steps (weight reads + eager overhead) + FLOP-bound full forwards at the stated MFU;",
        "a batched lower bound: the paper's unbatched runs took far longer (method §7.1: 1-3 GPU-hours for a",
        "20-prompt one-family shard; ~1.4k GPU-hours in all).",
    ]
    return "\n".join(lines)


# ---- running the recipe (on a GPU host with the checkpoints) ----------------------------------------
RUN_STAGES: tuple[str, ...] = ("crosspatch", "controls", "forced_tokens", "continuation")
STAGE_TABLES: dict[str, tuple[str, ...]] = {
    "crosspatch": ("cells",),
    "controls": ("offmanifold", "baselines", "margins"),
    "forced_tokens": ("forced_tokens",),
    "continuation": ("continuation",),
}


def _run_pair(
    p: PaperPair,
    prompts: Sequence[PromptRecord],
    folder: Path,
    stages: Sequence[str],
    device: str,
    dtype: str,
    batch_size: int,
    seed: int,
    log: Callable[[str], None],
) -> None:
    """One pair's tables into `folder/<table>.parquet`; a finished file is kept (resume)."""
    import pyarrow.parquet as pq

    from crosspatch.engine.baselines import baseline_cells
    from crosspatch.engine.commitment import boundary_margins
    from crosspatch.engine.continuation import continuation_table
    from crosspatch.engine.crosspatch import crosspatch
    from crosspatch.engine.divergence import find_divergences
    from crosspatch.engine.forced import forced_table
    from crosspatch.engine.offmanifold import offmanifold
    from crosspatch.engine.pairs import load_pair
    from crosspatch.engine.results import events_from_table, events_table

    tables = ["events", *(t for s in stages for t in STAGE_TABLES[s])]
    if all((folder / f"{t}.parquet").is_file() for t in tables):
        log(f"{p.family}: done already")
        return
    log(f"{p.family}: loading {p.pt}@{p.pt_revision} and {p.it}@{p.it_revision} ({dtype}, {device})")
    pair = load_pair(
        p.pt,
        p.it,
        device=device,
        dtype=dtype,
        family=p.family,
        pair_id=p.pair_id,
        pt_revision=p.pt_revision,
        it_revision=p.it_revision,
    )
    b, bs = p.boundary, batch_size
    events_path = folder / "events.parquet"
    if not events_path.is_file():
        log(f"{p.family}: divergence")
        events = find_divergences(pair, prompts, max_new_tokens=128, batch_size=bs)
        _write(events_table(events, pair.family, pair.pair_id), events_path)
    events = events_from_table(pq.read_table(events_path))
    makers = {
        "cells": lambda: crosspatch(pair, events, boundary=b, readouts=("it", "pt"), batch_size=bs),
        "offmanifold": lambda: offmanifold(pair, events, boundary=b, batch_size=bs)[0],
        "baselines": lambda: baseline_cells(pair, events, boundary=b, batch_size=bs),
        "margins": lambda: boundary_margins(pair, events, boundary=b, batch_size=bs),
        "forced_tokens": lambda: forced_table(pair, events, prompts, batch_size=bs),
        "continuation": lambda: continuation_table(pair, events, boundary=b, batch_size=bs, seed=seed),
    }
    for name in tables[1:]:
        path = folder / f"{name}.parquet"
        if not path.is_file():
            log(f"{p.family}: {name}")
            _write(makers[name](), path)


def _write(table: object, path: Path) -> None:
    """Write a Parquet file atomically (temp name, then rename)."""
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.rename(path)


def run_recipe(
    pairs: Sequence[PaperPair],
    prompts: Sequence[PromptRecord],
    out: str | Path,
    *,
    device: str = "cuda",
    dtype: str = "bfloat16",
    batch_size: int = 16,
    stages: Sequence[str] = RUN_STAGES,
    n_resamples: int = 2000,
    seed: int = 23,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Run the recipe pair by pair into `out/<family>/<table>.parquet` (finished files are never redone),
    then the cross-pair summaries into `out/<summary>.parquet`. Returns {summary: path}."""
    import gc

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from crosspatch.engine.continuation import summarize_continuation
    from crosspatch.engine.forced import summarize_forced
    from crosspatch.engine.stats import summarize

    unknown = [s for s in stages if s not in RUN_STAGES]
    if unknown or not stages:
        raise ValueError(f"unknown stages {unknown}; choose from {', '.join(RUN_STAGES)}")
    out = Path(out)
    for p in pairs:
        folder = out / p.family
        folder.mkdir(parents=True, exist_ok=True)
        _run_pair(p, prompts, folder, stages, device, dtype, batch_size, seed, log)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    summaries = {
        "summaries": (
            "cells",
            lambda t: summarize(t, n_resamples=n_resamples, seed=seed, position_min=(3, 5)),
        ),
        "forced_summaries": ("forced_tokens", lambda t: summarize_forced(t, n_resamples=1000, seed=seed)),
        "continuation_summaries": (
            "continuation",
            lambda t: summarize_continuation(t, n_resamples=n_resamples, seed=seed),
        ),
    }
    written: dict[str, Path] = {}
    for name, (source, fn) in summaries.items():
        paths = [out / p.family / f"{source}.parquet" for p in pairs]
        tables = [pq.read_table(x) for x in paths if x.is_file()]
        if tables and sum(t.num_rows for t in tables):
            written[name] = out / f"{name}.parquet"
            summary = fn(pa.concat_tables(tables))
            _write(summary, written[name])
            log(f"wrote {written[name]}")
            log(_format(name, summary))
    return written


def _format(name: str, summary: object) -> str:
    """The plain-text table of one cross-pair summary (engine.report)."""
    from crosspatch.engine.report import format_continuation, format_forced, format_summary

    render = {"summaries": format_summary, "forced_summaries": format_forced}.get(name, format_continuation)
    return render(summary)
