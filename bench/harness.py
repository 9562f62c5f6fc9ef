"""Shared benchmark harness: warm-up, repeats, median and spread, peak memory, and model/prompt builders.

Every benchmark measures its contenders side by side in one run and prints ratios; none of this runs
in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crosspatch.engine.organisms.tiny import Shape, family_config, perturbed_copy, word_tokenizer


@dataclass
class Timing:
    """Seconds per call over `repeats` calls after warm-up."""

    name: str
    median: float
    low: float
    high: float
    repeats: int
    times: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.name:<34} {self.median:8.3f}s  [{self.low:.3f}, {self.high:.3f}]  (n={self.repeats})"


def measure(name: str, fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times; report median and min/max."""
    return measure_interleaved({name: fn}, repeats, warmup)[0]


def measure_interleaved(
    contenders: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1
) -> list[Timing]:
    """Like `measure`, but round-robin over the contenders each repeat, so background load on a shared
    machine falls on all of them alike; one `Timing` per contender, in the given order."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return [Timing(n, statistics.median(t), min(t), max(t), repeats, t) for n, t in times.items()]


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over repeats of a_i / b_i, for timings taken interleaved (robust to load that drifts)."""
    return statistics.median(x / y for x, y in zip(a.times, b.times, strict=True))


def peak_memory_mb(device: str) -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    """What produced the numbers: CPU/GPU, cores, library versions."""
    import transformers

    info = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def base_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a real model's shapes (random init): sets --layers, --d-model, --vocab, heads and MLP width",
    )
    return parser


def shape_args(parser: argparse.ArgumentParser, batch_size: int = 16, batch_help: str | None = None) -> None:
    """The random pair's shape and workload: --layers, --d-model, --vocab, --prompts, --batch-size."""
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)


# Real shapes for the GPU runs (random weights: only speed and memory are measured), with their own keys.
PRESETS: dict[str, tuple[Shape, dict[str, object]]] = {
    "llama-3.1-8b": (
        Shape(32, 4096, 14336, 32, 8, vocab=128256, max_positions=131072),
        {"rope_theta": 500000.0},
    ),
}


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse and apply the common options (threads, preset shapes: `args.config` holds the overrides)."""
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.preset_shape = None
    if args.preset:
        args.preset_shape = PRESETS[args.preset]
        shape = args.preset_shape[0]
        args.layers, args.d_model, args.vocab = shape.layers, shape.d_model, shape.vocab
    return args


def pair_from_args(args, **kwargs):
    """`random_llama_pair` with the script's shape, device, dtype, preset and `--it-scale` (if it has one)."""
    kwargs.setdefault("it_scale", getattr(args, "it_scale", 0.02))
    return random_llama_pair(
        args.layers,
        args.d_model,
        args.vocab,
        device=args.device,
        dtype=args.dtype,
        preset=getattr(args, "preset_shape", None),
        **kwargs,
    )


def setup(parser: argparse.ArgumentParser):
    """The usual preamble: parse the options, build the random pair and `--prompts` random prompts.

    Returns (args, pair, prompts)."""
    args = parse(parser)
    pair = pair_from_args(args)
    return args, pair, random_prompts(args.prompts)


def random_llama_pair(
    n_layers: int = 12,
    d_model: int = 256,
    vocab: int = 8192,
    it_scale: float = 0.02,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    preset: tuple[Shape, dict[str, object]] | None = None,
):
    """A random-initialised Llama PT and a perturbed IT of the given shape (no weights needed for speed)."""
    from transformers import AutoModelForCausalLM

    from crosspatch.engine.pairs import ModelPair, resolve_dtype

    torch.manual_seed(seed)
    d = d_model
    shape = Shape(n_layers, d, int(2.6875 * d), max(1, d // 64), max(1, d // 256), vocab, 4096)
    shape, keys = preset or (shape, {})
    cfg = family_config("llama", shape, **keys)
    if device == "cpu":
        pt = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        _init(pt, d_model)
        it = perturbed_copy(pt, it_scale, seed + 1) if it_scale else pt
        pt, it = (m.to(dtype=resolve_dtype(dtype)).eval().requires_grad_(False) for m in (pt, it))
    else:
        # On an accelerator, build in the target dtype on the device (an 8B model in fp32 twice would not
        # fit) and perturb there.
        with torch.device(device):
            pt = AutoModelForCausalLM.from_config(cfg, dtype=resolve_dtype(dtype))
        _init(pt, d_model)
        it = _perturbed_on_device(pt, it_scale, seed + 1) if it_scale else pt
        pt, it = (m.eval().requires_grad_(False) for m in (pt, it))
    return ModelPair.from_models(
        pt, it, word_tokenizer(min(vocab, 4096)), family="llama", pair_id=f"bench-{n_layers}x{d_model}"
    )


@torch.no_grad()
def _init(model, d_model: int) -> None:
    for p in model.parameters():
        if p.ndim == 2:
            p.normal_(0.0, 0.5 / d_model**0.5 * 4)


@torch.no_grad()
def _perturbed_on_device(model, scale: float, seed: int):
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in other.parameters():
        p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype), alpha=scale)
    return other


def random_prompts(n: int, seed: int = 0, min_len: int = 16, max_len: int = 48, vocab: int = 4096):
    from crosspatch.engine.organisms.tiny import random_prompts as _rp

    return _rp(n, seed=seed, min_len=min_len, max_len=max_len, vocab_size=vocab)


def report(
    title: str,
    timings: list[Timing],
    ratios: dict[str, float],
    extra: dict | None = None,
    out: Path | None = None,
) -> None:
    print(f"\n== {title}")
    for t in timings:
        print(t)
    for k, v in ratios.items():
        print(f"{k:<48} {v:8.2f}x")
    if extra:
        for k, v in extra.items():
            print(f"{k:<48} {v}")
    print(f"machine: {json.dumps(machine())}")
    if out:
        out.write_text(
            json.dumps(
                {
                    "title": title,
                    "timings": [t.__dict__ for t in timings],
                    "ratios": ratios,
                    "extra": extra or {},
                    "machine": machine(),
                },
                indent=2,
            )
        )
