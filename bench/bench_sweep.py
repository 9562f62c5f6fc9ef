"""Boundary sweep: one `crosspatch(..., boundary="sweep")` vs one crosspatch run per boundary.

    python bench/bench_sweep.py --layers 12 --d-model 256 --prompts 64

A sweep over boundaries 1..L-1 runs the two clean passes once and then two late stacks per boundary:
2 + 2 x sum_b (L-b)/L = L+1 full-pass equivalents. Separate runs redo the clean passes for every
boundary: sum_b (2 + 2(L-b)/L) = 3(L-1). The compute limit of the ratio is 3(L-1)/(L+1) (33/13 = 2.54
at L=12); the target is >= 2.2x. Both contenders must produce the same cells table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from bench_crosspatch import forced_events
from harness import base_args, measure_interleaved, pair_from_args, paired_ratio, parse, report, shape_args

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.results import CELL_COLUMNS


def separate_runs(pair, events, boundaries, batch_size: int) -> pa.Table:
    parts = [crosspatch(pair, events, b, batch_size=batch_size) for b in boundaries]
    return pa.concat_tables(parts).sort_by(
        [("prompt_id", "ascending"), ("boundary", "ascending"), ("readout", "ascending")]
    )


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    shape_args(parser, batch_size=32)
    args = parse(parser)
    pair = pair_from_args(args)
    events = forced_events(pair, args.prompts)
    boundaries = pair.resolve_boundaries("sweep")
    bs = args.batch_size

    swept = crosspatch(pair, events, "sweep", batch_size=bs)
    apart = separate_runs(pair, events, boundaries, bs)
    assert swept.num_rows == apart.num_rows == args.prompts * len(boundaries)
    tol = 1e-4 if args.dtype == "float32" else 5e-2
    max_diff = max(float(np.max(np.abs(swept[c].to_numpy() - apart[c].to_numpy()))) for c in CELL_COLUMNS)
    assert max_diff <= tol * max(1.0, float(np.max(np.abs(apart["y_itup_itlate"].to_numpy())))), max_diff

    # Interleaved, so load from other processes hits both alike.
    timings = measure_interleaved(
        {
            "sweep (all boundaries, one run)": lambda: crosspatch(pair, events, "sweep", batch_size=bs),
            f"separate runs ({len(boundaries)} boundaries)": lambda: separate_runs(
                pair, events, boundaries, bs
            ),
        },
        args.repeats,
        warmup=0,  # the equality check above warmed both up
    )
    L = args.layers
    ratios = {
        "separate runs / sweep": paired_ratio(timings[1], timings[0]),
        "compute limit 3(L-1)/(L+1)": 3 * (L - 1) / (L + 1),
    }
    report(
        f"boundary sweep, random Llama {L}x{args.d_model}, {args.prompts} prompts, bs {bs}, "
        f"{args.device} {args.dtype}",
        timings,
        ratios,
        extra={"max |cell difference| sweep vs separate": f"{max_diff:.2e}"},
        out=args.json,
    )


if __name__ == "__main__":
    main()
