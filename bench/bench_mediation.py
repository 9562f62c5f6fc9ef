"""Mediation vs a per-prompt ablation loop (plain torch hooks), and vs its counted floor.

    python bench/bench_mediation.py --prompts 48 --repeats 3

crosspatch: `engine.mediation.mediate` (ranking on the fit split; on the test split the 2x2, then every
  run's ablation (II, PI) and rescue (PI) stacked along the batch in one late-stack forward per kind).
researcher loop: what one writes with plain hooks, one test prompt at a time: a PT forward capturing the
  boundary input, then for each run (the same sets mediate tested: top-k, matched-random and same-delta
  seeds, single features) an IT forward with a forward hook on the dictionary layer's MLP ablating the set
  at the last position (II), and the same with PT's boundary residual patched in (PI); no rescue passes
  (so the loop does less work than mediate); the ranking as mediate's (not the part a loop would change).
floor: the counted passes with no intervention code: the fit split's two late stacks forward + backward,
  the test split's clean passes and 2x2, and one plain stacked late-stack forward from the dictionary layer
  over all runs x test events (3 passes per run, 2 per single feature), i.e. mediate's work without edits.
"""

from __future__ import annotations

import torch
from harness import base_args, measure_interleaved, paired_ratio, report, setup, shape_args

from crosspatch.engine.crosspatch import clean_passes, crosspatch_batch, event_batches
from crosspatch.engine.mediation import (
    DirectionDictionary,
    MediationConfig,
    it_late_margins,
    mediate,
    rank_features,
    split_events,
)
from crosspatch.engine.organisms.tiny import forced_events


def researcher_loop(pair, test, dictionary, runs, boundary):
    """One prompt at a time, one forward per (run, cell), plain `register_forward_hook`s."""
    it_blocks = pair.it_adapter.blocks
    mlp = pair.it_adapter.mlp(dictionary.layer)
    out = []
    grab: dict = {}
    for ev in test:
        ids = torch.tensor([ev.input_ids])
        h = pair.pt_adapter.blocks[boundary].register_forward_pre_hook(
            lambda m, a, k: grab.__setitem__("x", (a[0] if a else k["hidden_states"]).clone()),
            with_kwargs=True,
        )
        with torch.no_grad():
            pair.pt(input_ids=ids)
        h.remove()
        for feats in runs:
            idx = torch.tensor(feats)

            def ablate(m, a, o, idx=idx):
                o = o.clone()
                acts = dictionary.encode(o[:, -1])[:, idx]
                o[:, -1] -= acts @ dictionary.W_dec[idx]
                return o

            ys = []
            for patched in (False, True):
                hs = [mlp.register_forward_hook(ablate)]
                if patched:
                    hs.append(
                        it_blocks[boundary].register_forward_pre_hook(
                            lambda m, a, k: (
                                ((grab["x"], *a[1:]), k) if a else (a, {**k, "hidden_states": grab["x"]})
                            ),
                            with_kwargs=True,
                        )
                    )
                with torch.no_grad():
                    logits = pair.it(input_ids=ids).logits[0, -1]
                for x in hs:
                    x.remove()
                ys.append(float(logits[ev.t_it] - logits[ev.t_pt]))
            out.append(ys)
    return out


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    shape_args(parser, batch_size=16)
    parser.add_argument("--latents", type=int, default=256)
    parser.add_argument("--boundary", type=int, default=7)
    args, pair, prompts = setup(parser)
    events = forced_events(pair, prompts)
    layer = pair.n_layers - 1
    g = torch.Generator().manual_seed(0)
    dictionary = DirectionDictionary(
        "rand",
        layer,
        torch.nn.functional.normalize(torch.randn(args.latents, pair.it_adapter.d_model, generator=g)),
    )
    cfg = MediationConfig(
        top_k=16, ks=(4, 8, 16), boundary=args.boundary, neighbours=10, n_single_features=8,
        n_resamples=200, batch_size=args.batch_size, fit_fraction=0.25,
    )  # fmt: skip
    res = mediate(pair, events, [dictionary], cfg)
    runs = [[lat for _, lat in feats] for feats in res.sets.values()]
    n_single = min(cfg.n_single_features, max(len(f) for f in runs))
    runs_all = runs + [[f] for f in max(runs, key=len)[:n_single]]  # singles: from the largest set
    b = args.boundary
    fit, test = split_events(events, cfg.fit_fraction, cfg.split_seed)
    n_passes_per_event = 3 * len(runs) + 2 * n_single  # late stacks per test event besides the 2x2

    def floor():
        rank_features(pair, fit, [dictionary], cfg, record_acts=False)
        for _, ids, mask, tokens in event_batches(pair, test, cfg.batch_size):
            passes = clean_passes(pair, ids, mask, [b])
            crosspatch_batch(pair, ids, mask, tokens[:, 1], tokens[:, 0], [b], ("it",), passes)
            ident = {layer: lambda x, xi, L: x}
            it_late_margins(pair, "it", passes, b, tokens, mask, [ident] * (n_passes_per_event // 2))
            it_late_margins(
                pair, "pt", passes, b, tokens, mask, [ident] * (n_passes_per_event - n_passes_per_event // 2)
            )

    def loop():
        rank_features(pair, fit, [dictionary], cfg, record_acts=False)
        return researcher_loop(pair, test, dictionary, runs_all, b)

    timings = measure_interleaved(
        {
            "mediate": lambda: mediate(pair, events, [dictionary], cfg),
            "counted floor": floor,
            "per-prompt hook loop": loop,
        },
        args.repeats,
        warmup=0,
    )
    t = {x.name: x for x in timings}
    report(
        f"mediation, random Llama {args.layers}x{args.d_model}, {len(test)} test events, {len(runs_all)} runs",
        timings,
        {
            "loop / mediate": paired_ratio(t["per-prompt hook loop"], t["mediate"]),
            "mediate / counted floor": paired_ratio(t["mediate"], t["counted floor"]),
        },
        extra={"late-stack passes per test event (besides the 2x2)": n_passes_per_event},
        out=args.json,
    )


if __name__ == "__main__":
    main()
