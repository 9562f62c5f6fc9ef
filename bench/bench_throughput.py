"""Issue 20: continuous-batching divergence vs lockstep, and the fused divergence + 2x2 vs unfused.

    python bench/bench_throughput.py --repeats 5          # both parts
    python bench/bench_throughput.py --part continuous    # or: --part fused

continuous: `find_divergences(continuous=True)` (a row that diverges or stops gives its slot to the next
  prompt at once) vs `continuous=False` (lockstep batches of `--batch-size` prompts that decode until their
  last row finishes). The script asserts identical events (position, tokens, prefix, reason, near-tie).
fused: the whole job (divergence then the 2x2 at one boundary, common-IT readout) fused
  (`iter_divergences(capture=[b])`, the 2x2 runs only the two off-diagonal late stacks) vs unfused
  (`find_divergences` then `crosspatch`, which reruns the two full forwards); and the floor: divergence
  alone + the fused 2x2 on captures (= the two late stacks and the readouts). Cells are asserted equal
  within 1e-4.
All contenders are timed interleaved call by call; ratios are medians of back-to-back ratios.
"""

from __future__ import annotations

import numpy as np
from bench_divergence import position_summary
from harness import base_args, measure_interleaved, paired_ratio, report, setup, shape_args

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import find_divergences, iter_divergences
from crosspatch.engine.results import CELL_COLUMNS

# Tuned on the default 12x256 pair (seed 0): quartiles 2/6/12, a tail to 37.
DEFAULT_IT_SCALE = 0.0002


def key(e) -> tuple:
    return (e.prompt_id, e.reason, e.position, e.t_pt, e.t_it, tuple(e.prefix_ids), e.near_tie)


def bench_continuous(args, pair, prompts) -> None:
    n, bs = args.max_new_tokens, args.batch_size
    lock = find_divergences(pair, prompts, n, bs, continuous=False)
    cont = find_divergences(pair, prompts, n, bs)
    assert [key(e) for e in cont] == [key(e) for e in lock], "continuous and lockstep events differ"
    print(f"first-divergence positions: {position_summary(lock)}")
    timings = measure_interleaved(
        {
            f"lockstep bs={bs}": lambda: find_divergences(pair, prompts, n, bs, continuous=False),
            f"continuous bs={bs}": lambda: find_divergences(pair, prompts, n, bs),
        },
        args.repeats,
        warmup=0,
    )
    report(
        f"continuous vs lockstep divergence, random Llama {args.layers}x{args.d_model}, {args.prompts} prompts",
        timings,
        {"lockstep / continuous": paired_ratio(timings[0], timings[1])},
        extra={"events equal": True, "positions": position_summary(lock)},
        out=args.json,
    )


def bench_fused(args, pair, prompts) -> None:
    n, bs, b = args.max_new_tokens, args.batch_size, args.boundary

    def fused():
        events = [e for c in iter_divergences(pair, prompts, n, bs, capture=[b]) for e in c]
        return crosspatch(pair, events, b, batch_size=args.cells_batch_size)

    def unfused():
        events = find_divergences(pair, prompts, n, bs)
        return crosspatch(pair, events, b, batch_size=args.cells_batch_size)

    def captured():
        return [e for c in iter_divergences(pair, prompts, n, bs, capture=[b]) for e in c]

    a, c = fused(), unfused()
    worst = max(float(np.abs(a[k].to_numpy() - c[k].to_numpy()).max()) for k in CELL_COLUMNS)
    assert worst < 1e-4, worst
    pool: list = []  # captured events, made outside the timed late-stack call

    def late_only():
        crosspatch(pair, pool.pop(), b, batch_size=args.cells_batch_size, check_noop=False)

    def divergence_and_capture():
        pool.append(captured())

    timings = measure_interleaved(
        {
            "unfused job": unfused,
            "fused job": fused,
            "divergence alone": lambda: find_divergences(pair, prompts, n, bs),
            "divergence with capture": divergence_and_capture,
            "2x2 on captures (late stacks)": late_only,
        },
        args.repeats,
        warmup=0,
    )
    t = {x.name: x for x in timings}
    floor = [
        d + s
        for d, s in zip(t["divergence alone"].times, t["2x2 on captures (late stacks)"].times, strict=True)
    ]
    fused_over_floor = float(np.median([f / x for f, x in zip(t["fused job"].times, floor, strict=True)]))
    report(
        f"fused vs unfused whole job, random Llama {args.layers}x{args.d_model}, {args.prompts} prompts, boundary {b}",
        timings,
        {
            "unfused / fused": paired_ratio(t["unfused job"], t["fused job"]),
            "fused / (divergence + late stacks)": fused_over_floor,
            "capture overhead (with / without)": paired_ratio(
                t["divergence with capture"], t["divergence alone"]
            ),
        },
        extra={"max |cell diff|": worst},
        out=None if args.json is None else args.json.with_suffix(".fused.json"),
    )


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    shape_args(parser, batch_size=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--it-scale", type=float, default=DEFAULT_IT_SCALE)
    parser.add_argument("--boundary", type=int, default=7)
    parser.add_argument("--cells-batch-size", type=int, default=32)
    parser.add_argument("--part", choices=["both", "continuous", "fused"], default="both")
    parser.add_argument("--probe", action="store_true", help="only print the divergence positions")
    args, pair, prompts = setup(parser)
    if args.probe:
        print(position_summary(find_divergences(pair, prompts, args.max_new_tokens, args.batch_size)))
        return
    if args.part in ("both", "continuous"):
        bench_continuous(args, pair, prompts)
    if args.part in ("both", "fused"):
        bench_fused(args, pair, prompts)


if __name__ == "__main__":
    main()
