"""Whole job (first divergence + 2x2) by crosspatch vs the notebook a researcher would write instead.

    python bench/bench_job.py --layers 12 --d-model 256 --prompts 64

- crosspatch: `find_divergences` (batched lockstep decoding, early stop) then `crosspatch` (batched 2x2,
  common-IT readout at the default boundary).
- notebook: per prompt, `generate` 128 greedy tokens on PT and on IT (real-token mask as a
  `LogitsProcessor`), the first index where they differ, then four nnsight traces on prompt + shared
  prefix (capture PT, capture IT, IT patched with PT's boundary state, PT patched with IT's), reading
  each final residual through IT's final norm and unembedding (the method's common-IT readout).
Same prompts, same events (asserted), same cells (asserted to 1e-4). The notebook is slow (minutes), so
it runs once; crosspatch runs once to warm up and `--repeats` times timed around it.
"""

from __future__ import annotations

import time
import warnings

import torch
from bench_divergence import DEFAULT_IT_SCALE, assert_same_events, generate_then_compare
from harness import Timing, base_args, report, setup, shape_args

from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import find_divergences
from crosspatch.engine.results import CELL_COLUMNS


def crosspatch_job(pair, prompts, batch_size: int):
    events = find_divergences(pair, prompts, max_new_tokens=128, batch_size=batch_size)
    return events, crosspatch(pair, events, batch_size=32)


def nnsight_cells(lms, pair, events, b: int) -> dict[str, dict[str, float]]:
    """Per diverged event, four nnsight traces; `{prompt_id: {cell column: Y}}` with IT's readout."""
    lm_pt, lm_it = lms
    it_norm, it_head = pair.it.model.norm, pair.it.lm_head
    out = {}
    for e in events:
        if not e.diverged:
            continue
        ids = torch.tensor([e.input_ids], device=pair.pt.device)
        with lm_pt.trace(ids):
            u_pt = lm_pt.model.layers[b].input.save()
            f_pp = lm_pt.model.norm.input.save()
        with lm_it.trace(ids):
            u_it = lm_it.model.layers[b].input.save()
            f_ii = lm_it.model.norm.input.save()
        with lm_it.trace(ids):
            lm_it.model.layers[b].input = u_pt
            f_pi = lm_it.model.norm.input.save()
        with lm_pt.trace(ids):
            lm_pt.model.layers[b].input = u_it
            f_ip = lm_pt.model.norm.input.save()
        with torch.no_grad():
            y = {}
            for col, f in (
                ("y_ptup_ptlate", f_pp),
                ("y_ptup_itlate", f_pi),
                ("y_itup_ptlate", f_ip),
                ("y_itup_itlate", f_ii),
            ):
                logits = it_head(it_norm(f[0, -1])).float()
                y[col] = float(logits[e.t_it] - logits[e.t_pt])
        out[e.prompt_id] = y
    return out


def notebook_job(pair, lms, prompts, b: int):
    events = generate_then_compare(pair, prompts, 128, batch_size=1)  # per prompt, no padding
    return events, nnsight_cells(lms, pair, events, b)


def make_nnsight(pair):
    from nnsight import LanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LanguageModel(pair.pt, tokenizer=pair.tokenizer), LanguageModel(
            pair.it, tokenizer=pair.tokenizer
        )


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    shape_args(parser, batch_size=16, batch_help="crosspatch's divergence batch size")
    parser.add_argument("--it-scale", type=float, default=DEFAULT_IT_SCALE)
    args, pair, prompts = setup(parser)
    b = pair.default_boundary
    lms = make_nnsight(pair)
    # Warm-up both paths on a couple of prompts (imports, nnsight's first-trace setup, allocator).
    crosspatch_job(pair, prompts[:2], args.batch_size)
    notebook_job(pair, lms, prompts[:1], b)

    cp_times = []
    t, (events, table) = timed(lambda: crosspatch_job(pair, prompts, args.batch_size))
    cp_times.append(t)
    t_nb, (nb_events, nb_cells) = timed(lambda: notebook_job(pair, lms, prompts, b))
    for _ in range(max(0, args.repeats - 1)):
        cp_times.append(timed(lambda: crosspatch_job(pair, prompts, args.batch_size))[0])

    assert_same_events(events, nb_events)
    rows = table.to_pylist()
    assert len(rows) == len(nb_cells) == sum(e.diverged for e in events)
    tol = 1e-4 if args.dtype == "float32" else 5e-2
    max_diff = max(abs(r[c] - nb_cells[r["prompt_id"]][c]) for r in rows for c in CELL_COLUMNS)
    assert max_diff <= tol, f"cells differ by {max_diff:.2e}"

    import statistics

    t_cp = Timing(
        "crosspatch job (divergence + 2x2)",
        statistics.median(cp_times),
        min(cp_times),
        max(cp_times),
        len(cp_times),
        cp_times,
    )
    t_notebook = Timing("notebook (generate x2, nnsight x4)", t_nb, t_nb, t_nb, 1, [t_nb])
    report(
        f"whole job, random Llama {args.layers}x{args.d_model} (IT = PT + {args.it_scale} noise), "
        f"{args.prompts} prompts, boundary {b}, {args.device} {args.dtype}",
        [t_cp, t_notebook],
        {
            "notebook / crosspatch (median)": t_nb / t_cp.median,
            "notebook / crosspatch (nearest crosspatch runs)": t_nb / statistics.mean(cp_times[:2]),
        },
        extra={
            "events equal": True,
            "diverged events": len(rows),
            "max |cell difference|": f"{max_diff:.2e}",
        },
        out=args.json,
    )


if __name__ == "__main__":
    main()
