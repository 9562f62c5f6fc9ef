"""Scaling of the 2x2: time and peak memory vs number of prompts, and time vs model size.

    python bench/bench_scaling.py                   # ~3-5 minutes on a 2-core CPU

Each point runs in a fresh subprocess, so its peak memory (peak RSS on CPU, peak allocated on CUDA) is
its own. Expectation: time linear in prompts (events/s flat), peak memory flat (within 10%) from 256 to
4096 prompts, because activations live for one batch at a time and the cells table is a few hundred
bytes an event. The prompt-count series uses a smaller model (`--prompt-layers` x `--prompt-d-model`) to
keep the script short; the model-size series uses `--size-prompts` prompts on `--layers` layers.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import base_args, machine, parse, peak_memory_mb

HERE = Path(__file__).resolve().parent


def child(args) -> None:
    """One measurement point, in its own process: prints one JSON line."""
    import torch
    from bench_crosspatch import forced_events
    from harness import pair_from_args

    from crosspatch.engine.crosspatch import crosspatch

    pair = pair_from_args(args)
    events = forced_events(pair, args.n)
    crosspatch(pair, events[: args.batch_size], batch_size=args.batch_size)  # warm-up: one batch
    loaded = peak_memory_mb(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    table = crosspatch(pair, events, batch_size=args.batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert table.num_rows == args.n
    print(
        json.dumps(
            dict(
                n=args.n,
                layers=args.layers,
                d_model=args.d_model,
                seconds=seconds,
                events_per_s=args.n / seconds,
                peak_mb=peak_memory_mb(args.device),
                after_warmup_mb=loaded,
            )
        )
    )


def run_point(args, n: int, layers: int, d_model: int) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "bench_scaling.py"),
        "--child",
        "--n", str(n),
        "--layers", str(layers),
        "--d-model", str(d_model),
        "--vocab", str(args.vocab),
        "--batch-size", str(args.batch_size),
        "--device", args.device,
        "--dtype", args.dtype,
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.preset:
        cmd += ["--preset", args.preset]
    env = {**os.environ, **dict(kv.split("=", 1) for kv in args.child_env)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    point = json.loads(out.strip().splitlines()[-1])
    print(
        f"  n={n:<5} {layers}x{d_model:<4} {point['seconds']:8.2f}s  {point['events_per_s']:8.1f} events/s  "
        f"peak {point['peak_mb']:8.1f} MiB (after one-batch warm-up {point['after_warmup_mb']:.1f})",
        flush=True,
    )
    return point


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help="internal: measure one point")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompt-counts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--prompt-layers", type=int, default=6)
    parser.add_argument("--prompt-d-model", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="d_model values")
    parser.add_argument("--size-prompts", type=int, default=256)
    parser.add_argument(
        "--child-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the measured processes, e.g. MALLOC_MMAP_THRESHOLD_=131072 (see RESULTS.md)",
    )
    args = parse(parser)
    if args.child:
        child(args)
        return

    if args.preset:  # a real shape: the prompt-count series only, on that shape
        print(f"prompt count, random {args.preset}, bs {args.batch_size}:")
        by_n = [run_point(args, n, args.layers, args.d_model) for n in args.prompt_counts]
        by_d = []
    else:
        print(f"prompt count, random Llama {args.prompt_layers}x{args.prompt_d_model}, bs {args.batch_size}:")
        by_n = [run_point(args, n, args.prompt_layers, args.prompt_d_model) for n in args.prompt_counts]
        print(f"model size, {args.size_prompts} prompts, {args.layers} layers, bs {args.batch_size}:")
        by_d = [run_point(args, args.size_prompts, args.layers, d) for d in args.sizes]

    first, last = by_n[0], by_n[-1]
    ratios = {
        f"time x (n {first['n']} -> {last['n']}; linear = {last['n'] / first['n']:.0f})": last["seconds"]
        / first["seconds"],
        f"events/s at n={last['n']} / at n={first['n']}": last["events_per_s"] / first["events_per_s"],
        f"peak memory at n={last['n']} / at n={first['n']}": last["peak_mb"] / first["peak_mb"],
    }
    for a, b in itertools.pairwise(by_d):
        ratios[f"time x (d_model {a['d_model']} -> {b['d_model']})"] = b["seconds"] / a["seconds"]
    print(f"\n== scaling, {args.device} {args.dtype}")
    for k, v in ratios.items():
        print(f"{k:<56} {v:8.2f}x")
    print(f"machine: {json.dumps(machine())}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"by_prompts": by_n, "by_d_model": by_d, "ratios": ratios, "machine": machine()}, indent=2
            )
        )


if __name__ == "__main__":
    main()
