"""Drift report (issue 22): the same real-shaped random pair run in fp32 and in bf16.

    python bench/bench_precision.py --configs llama-3.2-1b gemma-3-1b --prompts 48 --json out.json

For each config (Llama-3.2-1B-like and Gemma-3-1B-like: real d_model, heads, MLP width and vocabulary,
random weights, no download; `--layers` scales the depth down for a CPU) the fp32 pair is the reference:

- events: first divergences of the fp32 pair and of the same weights cast to bf16; agreement = the
  prompt's outcome (reason, position, t_pt, t_it) is identical; near ties flagged in each run, and how many
  of the events that changed were flagged.
- interaction drift: the fp32 run's scored events, scored again by the bf16 pair at the headline boundary
  (common-IT readout), with the engine's fp32 readout (final norm + the two unembedding columns in fp32
  from the bf16 final residual) and with a bf16 readout (the old computation: norm and columns in bf16);
  per-event |interaction_bf16 - interaction_fp32| (mean, median, max) and the drift of the mean.

Logit scale: random init gives logits of ~1; the final norm's gain is scaled so the median top-1 logit
at the prompts' last position is `--top-logit` (25: real 1B models' logits reach 20-30, where bf16's step
is 0.125), so bf16's rounding is as coarse as on a real checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from harness import base_args, parse, random_prompts, report

from crosspatch.engine.adapters import ArchAdapter
from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import DivergenceEvent, find_divergences
from crosspatch.engine.organisms.tiny import Shape, family_config, gemma3_keys, perturbed_copy, word_tokenizer
from crosspatch.engine.pairs import ModelPair

# Real shapes (config.json of meta-llama/Llama-3.2-1B and google/gemma-3-1b-pt) as (family, shape, own keys);
# depth is the shape's unless --layers overrides it. Rope settings are left at the library's defaults
# (positions here are < 100). Gemma is untied here (the real model ties): with random blocks, Gemma's
# sqrt(d)-scaled embedding dominates the residual and a tied readout just repeats the last input token.
CONFIGS: dict[str, tuple[str, Shape, dict[str, object]]] = {
    "llama-3.2-1b": (
        "llama",
        Shape(16, 2048, 8192, 32, 8, vocab=128256, max_positions=131072, tied=True),
        {"head_dim": 64},
    ),
    "gemma-3-1b": (
        "gemma3",
        Shape(26, 1152, 6912, 4, 1, vocab=262144, max_positions=32768),
        gemma3_keys(256, 512, 6),
    ),
}


def build_pair(name: str, layers: int, it_scale: float, seed: int = 0) -> ModelPair:
    """The fp32 random PT and IT = PT + `it_scale` x N(0, 1) of config `name`, with a full-vocab tokenizer."""
    from transformers import AutoModelForCausalLM

    family, shape, keys = CONFIGS[name]
    cfg = family_config(family, dataclasses.replace(shape, layers=layers), **keys)
    torch.manual_seed(seed)
    pt = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    it = perturbed_copy(pt, it_scale, seed + 1).eval().requires_grad_(False)
    return ModelPair.from_models(
        pt, it, word_tokenizer(shape.vocab), family=family, pair_id=f"{name}-{layers}L"
    )


@torch.no_grad()
def scale_logits(pair: ModelPair, prompts, target: float) -> float:
    """Scale both final norms' gain so PT's median top-1 logit at the prompts' last token is `target`."""
    tops = []
    for p in prompts[:8]:
        ids = torch.tensor([pair.tokenizer.encode(p.text)])
        tops.append(pair.pt(input_ids=ids).logits[0, -1].max().item())
    gain = target / float(np.median(tops))
    for adapter in (pair.pt_adapter, pair.it_adapter):
        w = adapter.final_norm.weight
        if "Gemma" in type(adapter.final_norm).__name__:  # Gemma's RMSNorm multiplies by (1 + weight)
            w.copy_((1.0 + w) * gain - 1.0)
        else:
            w.mul_(gain)
    return gain


def to_bf16(pair: ModelPair) -> ModelPair:
    """The same weights cast to bf16 (a new pair; the fp32 one is left as is)."""
    pt = copy.deepcopy(pair.pt).to(torch.bfloat16)
    it = copy.deepcopy(pair.it).to(torch.bfloat16)
    return ModelPair.from_models(pt, it, pair.tokenizer, family=pair.family, pair_id=pair.pair_id + "-bf16")


@contextmanager
def bf16_readout(pair: ModelPair) -> Iterator[None]:
    """Both adapters read margins the old way (norm and columns in the weights' dtype) inside the block."""

    def old(adapter: ArchAdapter):
        def readout(final_resid: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
            h = adapter.final_norm(final_resid.to(adapter.dtype))  # [..., d_model] bf16
            if token_ids is None:
                logits = adapter.unembed(h)
            else:
                logits = torch.einsum("...d,...kd->...k", h, adapter.unembed.weight[token_ids])  # bf16
            if adapter.softcap is not None:
                logits = torch.tanh(logits / adapter.softcap) * adapter.softcap
            return logits

        return readout

    adapters = (pair.pt_adapter, pair.it_adapter)
    for a in adapters:
        a.readout = old(a)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for a in adapters:
            del a.readout


def outcome(e: DivergenceEvent) -> tuple:
    """What a run decided for one prompt."""
    return (e.reason, e.position, e.t_pt, e.t_it)


def interactions(cells) -> dict[str, float]:
    """prompt id -> interaction (one boundary, one readout)."""
    return dict(
        zip(cells.column("prompt_id").to_pylist(), cells.column("interaction").to_pylist(), strict=True)
    )


def on_grid(values: np.ndarray, step: float = 1 / 64) -> float:
    """Fraction of values that are multiples of `step` (bf16 logits of magnitude 2-32 sit on 1/64 grids)."""
    return float(np.mean(np.isclose(values / step, np.round(values / step), atol=1e-6)))


def _log(t0: float, what: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {what}", file=sys.stderr, flush=True)


def run_config(name: str, args) -> dict:
    """Events, near ties and interaction drift of config `name` in fp32 and bf16."""
    t0 = time.perf_counter()
    shape = CONFIGS[name][1]
    layers = args.layers or shape.layers
    prompts = random_prompts(args.prompts, seed=args.seed, min_len=8, max_len=24, vocab=shape.vocab)
    pair32 = build_pair(name, layers, args.it_scale, args.seed)
    gain = scale_logits(pair32, prompts, args.top_logit)
    _log(t0, f"{name}: fp32 pair built")
    boundary = pair32.headline_boundary(None)

    ev32 = find_divergences(pair32, prompts, args.max_new_tokens, args.batch_size)
    scored = [e for e in ev32 if e.diverged]
    y32 = interactions(crosspatch(pair32, scored, boundary, batch_size=args.batch_size, check_noop=False))

    _log(t0, f"{name}: fp32 events and cells")
    pair16 = to_bf16(pair32)
    del pair32
    gc.collect()
    ev16 = find_divergences(pair16, prompts, args.max_new_tokens, args.batch_size)
    y_fp32_readout = interactions(
        crosspatch(pair16, scored, boundary, batch_size=args.batch_size, check_noop=False)
    )
    with bf16_readout(pair16):
        y_bf16_readout = interactions(
            crosspatch(pair16, scored, boundary, batch_size=args.batch_size, check_noop=False)
        )
    del pair16
    gc.collect()
    _log(t0, f"{name}: bf16 events and cells (both readouts)")

    ids = sorted(y32)
    if not ids:
        raise SystemExit(f"{name}: no scored events in the fp32 run; raise --it-scale or --max-new-tokens")
    ref = np.array([y32[i] for i in ids])
    drift = {}
    for label, y in (("fp32 readout", y_fp32_readout), ("bf16 readout", y_bf16_readout)):
        v = np.array([y[i] for i in ids])
        d = np.abs(v - ref)
        drift[label] = dict(
            mean=float(d.mean()),
            median=float(np.median(d)),
            max=float(d.max()),
            mean_interaction=float(v.mean()),
            drift_of_mean=float(abs(v.mean() - ref.mean())),
            on_1_64_grid=on_grid(v),
        )
    same = [outcome(a) == outcome(b) for a, b in zip(ev32, ev16, strict=True)]
    changed = [(a, b) for a, b, s in zip(ev32, ev16, same, strict=True) if not s]
    per_event = [
        dict(
            prompt_id=i, fp32=y32[i], bf16_fp32_readout=y_fp32_readout[i], bf16_bf16_readout=y_bf16_readout[i]
        )
        for i in ids
    ]
    return dict(
        config=name,
        layers=f"{layers} of {shape.layers}",
        d_model=shape.d_model,
        vocab=shape.vocab,
        final_norm_gain=gain,
        seconds=round(time.perf_counter() - t0, 1),
        boundary=boundary,
        prompts=len(prompts),
        scored_fp32=len(scored),
        scored_bf16=sum(e.diverged for e in ev16),
        event_agreement=f"{sum(same)}/{len(same)}",
        near_ties_fp32=sum(bool(e.near_tie) for e in ev32 if e.diverged),
        near_ties_bf16=sum(bool(e.near_tie) for e in ev16 if e.diverged),
        changed_flagged_fp32=f"{sum(bool(a.near_tie) for a, _ in changed)}/{len(changed)}",
        changed_flagged_bf16=f"{sum(bool(b.near_tie) for _, b in changed)}/{len(changed)}",
        median_top_gap_fp32=float(np.median([min(e.gap_pt, e.gap_it) for e in scored])),
        drift=drift,
        per_event=per_event,
        changed=[
            dict(prompt_id=a.prompt_id, fp32=outcome(a), bf16=outcome(b), gaps_fp32=(a.gap_pt, a.gap_it))
            for a, b in changed
        ],
    )


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=sorted(CONFIGS))
    parser.add_argument("--layers", type=int, help="scale every config's depth down to this many layers")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--it-scale", type=float, default=0.002)
    parser.add_argument("--top-logit", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parse(parser)
    extra: dict = {}
    for name in args.configs:
        r = run_config(name, args)
        print(
            f"\n-- {r['config']} ({r['layers']} layers, d_model {r['d_model']}, vocab {r['vocab']}; boundary {r['boundary']})"
        )
        print(f"{'prompt':<8} {'fp32 run':>10} {'bf16, fp32 readout':>20} {'bf16, bf16 readout':>20}")
        for e in r["per_event"][:12]:
            print(
                f"{e['prompt_id']:<8} {e['fp32']:>+10.4f} {e['bf16_fp32_readout']:>+20.4f} {e['bf16_bf16_readout']:>+20.4f}"
            )
        for c in r["changed"]:
            print(
                f"changed {c['prompt_id']}: fp32 {c['fp32']} -> bf16 {c['bf16']}; fp32 gaps {c['gaps_fp32']}"
            )
        for k in (
            "final_norm_gain",
            "scored_fp32",
            "scored_bf16",
            "event_agreement",
            "near_ties_fp32",
            "near_ties_bf16",
            "changed_flagged_fp32",
            "changed_flagged_bf16",
            "median_top_gap_fp32",
        ):
            extra[f"{r['config']} {k}"] = r[k] if not isinstance(r[k], float) else round(r[k], 4)
        for label, d in r["drift"].items():
            extra[f"{r['config']} drift, {label}"] = (
                f"per-event |dI| mean {d['mean']:.4f} median {d['median']:.4f} max {d['max']:.4f}; "
                f"mean interaction {d['mean_interaction']:+.4f} (drift {d['drift_of_mean']:.4f}); "
                f"on a 1/64 grid {d['on_1_64_grid']:.2f}"
            )
        ratio = r["drift"]["bf16 readout"]["mean"] / max(r["drift"]["fp32 readout"]["mean"], 1e-12)
        extra[f"{r['config']} mean per-event drift, bf16 / fp32 readout"] = f"{ratio:.2f}x"
        smaller = r["drift"]["fp32 readout"]["mean"] < r["drift"]["bf16 readout"]["mean"]
        extra[f"{r['config']} fp32 readout drifts less"] = smaller and math.isfinite(ratio)
        sys.stdout.flush()
    report("interaction drift vs the fp32 run (bf16 weights)", [], {}, extra, args.json)


if __name__ == "__main__":
    main()
