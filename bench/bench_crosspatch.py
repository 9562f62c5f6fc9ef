"""Cross-patch throughput: crosspatch's batched 2x2 vs per-prompt nnsight, per-prompt HF hooks, and the floor.

    python bench/bench_crosspatch.py --layers 12 --d-model 256 --prompts 256 --batch-size 32

- floor: the least compute the 2x2 needs, timed directly: per batch, two plain full passes (capturing
  the boundary input) plus two late-stack-only passes, with no readout or bookkeeping.
- nnsight (baseline A): per prompt, four traces: capture PT, capture IT, IT patched with PT's state,
  PT patched with IT's state (full forwards with full-vocab logits, as a notebook would).
- HF hooks (baseline B): the same four forwards with plain forward pre-hooks.
"""

from __future__ import annotations

import torch
from harness import (
    base_args,
    measure_interleaved,
    pair_from_args,
    paired_ratio,
    parse,
    random_prompts,
    report,
)

from crosspatch.engine.crosspatch import crosspatch, event_batches
from crosspatch.engine.divergence import DivergenceEvent
from crosspatch.engine.organisms import tiny


def forced_events(pair, n: int, seed: int = 0) -> list[DivergenceEvent]:
    """Events on random prompts with fixed token pairs, so every contender scores the same 2x2."""
    return tiny.forced_events(pair, random_prompts(n, seed=seed), t_pt=10, t_it=100, wrap=50)


def organism_pair(name: str, device: str):
    """A bundled organism's PT/IT pair (real divergences, real prompts)."""
    from crosspatch.engine.organisms import organism_path
    from crosspatch.engine.pairs import load_pair

    root = organism_path(name)
    return load_pair(root / "pt", root / "it", device=device, pair_id=name)


def organism_events(pair, n: int) -> list[DivergenceEvent]:
    """The organism's real first-divergence events, repeated (with fresh ids) up to `n`."""
    from dataclasses import replace

    from crosspatch.engine.divergence import find_divergences
    from crosspatch.engine.organisms import organism_path
    from crosspatch.engine.prompts import load_prompts

    prompts = load_prompts(organism_path(pair.pair_id) / "prompts.jsonl")
    found = [e for e in find_divergences(pair, prompts, batch_size=32) if e.diverged]
    return [replace(found[i % len(found)], prompt_id=f"e{i:05d}") for i in range(n)]


@torch.no_grad()
def floor(pair, events, b: int, batch_size: int) -> None:
    """Two full passes + two late stacks per batch, nothing else."""
    from crosspatch.engine.adapters import positions_from_mask

    for _, ids, mask, _ in event_batches(pair, events, batch_size):
        pos = positions_from_mask(mask)
        caps, ctxs = {}, {}
        for role in ("pt", "it"):
            a = pair.adapter(role)
            h = a.embed(ids, pos)
            ctxs[role] = a.context(h, mask, pos)
            _, caps[role] = a.run_layers(h, ctxs[role], capture_inputs=[b])
        pair.it_adapter.run_layers(caps["pt"][b], ctxs["it"], start=b)
        pair.pt_adapter.run_layers(caps["it"][b], ctxs["pt"], start=b)


def blocks(model):
    return model.model.layers


@torch.no_grad()
def hf_hooks_per_prompt(pair, events, b: int) -> list[float]:
    """Per prompt: capture both boundary states, then two patched full forwards (forward pre-hooks)."""
    out = []
    for e in events:
        ids = torch.tensor([e.input_ids], device=pair.pt.device)
        states, logits = {}, {}
        for role, model in (("pt", pair.pt), ("it", pair.it)):

            def grab(module, args, kwargs, role=role, states=states):
                states[role] = args[0]

            h = blocks(model)[b].register_forward_pre_hook(grab, with_kwargs=True)
            logits[(role, role)] = model(ids).logits[0, -1]
            h.remove()
        for up, host in (("pt", "it"), ("it", "pt")):
            model = pair.it if host == "it" else pair.pt

            def swap(module, args, kwargs, up=up, states=states):
                return (states[up], *args[1:]), kwargs

            h = blocks(model)[b].register_forward_pre_hook(swap, with_kwargs=True)
            logits[(up, host)] = model(ids).logits[0, -1]
            h.remove()
        out.append(float(logits[("it", "it")][e.t_it] - logits[("it", "it")][e.t_pt]))
    return out


def make_nnsight(pair):
    import warnings

    from nnsight import LanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LanguageModel(pair.pt, tokenizer=pair.tokenizer), LanguageModel(
            pair.it, tokenizer=pair.tokenizer
        )


def nnsight_per_prompt(lms, events, b: int) -> list[float]:
    """Per prompt, four nnsight traces (capture PT, capture IT, two patched runs)."""
    lm_pt, lm_it = lms
    out = []
    for e in events:
        ids = torch.tensor([e.input_ids], device=lm_pt.device)
        with lm_pt.trace(ids):
            u_pt = lm_pt.model.layers[b].input.save()
            l_pp = lm_pt.lm_head.output.save()
        with lm_it.trace(ids):
            u_it = lm_it.model.layers[b].input.save()
            l_ii = lm_it.lm_head.output.save()
        with lm_it.trace(ids):
            lm_it.model.layers[b].input = u_pt
            l_pi = lm_it.lm_head.output.save()
        with lm_pt.trace(ids):
            lm_pt.model.layers[b].input = u_it
            l_ip = lm_pt.lm_head.output.save()
        out.append(
            float(l_ii[0, -1, e.t_it] - l_ii[0, -1, e.t_pt] + 0 * (l_pp.sum() + l_pi.sum() + l_ip.sum()))
        )
    return out


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32])
    parser.add_argument(
        "--baseline-prompts", type=int, default=64, help="per-prompt baselines run on this many"
    )
    parser.add_argument("--no-nnsight", action="store_true")
    parser.add_argument(
        "--organism", help="a bundled Llama/Qwen organism (e.g. trained_llama) instead of a random pair"
    )
    args = parse(parser)
    pair = organism_pair(args.organism, args.device) if args.organism else pair_from_args(args)
    make_events = organism_events if args.organism else forced_events
    b = pair.default_boundary
    timings, ratios, extra = [], {}, {}
    # crosspatch and the floor are interleaved call by call (same batches), so background load on a
    # shared machine falls on both alike; the ratio is the median of the back-to-back pairs.
    for n in args.prompts:
        events = make_events(pair, n)
        for bs in args.batch_size:
            t_cp, t_fl = measure_interleaved(
                {
                    f"crosspatch 2x2 n={n} bs={bs}": lambda events=events, bs=bs: crosspatch(
                        pair, events, b, batch_size=bs
                    ),
                    f"floor n={n} bs={bs}": lambda events=events, bs=bs: floor(pair, events, b, bs),
                },
                args.repeats,
            )
            timings += [t_cp, t_fl]
            ratios[f"crosspatch / floor (n={n}, bs={bs})"] = paired_ratio(t_cp, t_fl)
            extra[f"crosspatch events/s (n={n}, bs={bs})"] = f"{n / t_cp.median:.1f}"
    nb = args.baseline_prompts
    events = make_events(pair, nb)
    bs = args.batch_size[0]
    contenders = {
        f"crosspatch 2x2 n={nb} bs={bs}": lambda: crosspatch(pair, events, b, batch_size=bs),
        f"floor n={nb} bs={bs}": lambda: floor(pair, events, b, bs),
        f"HF pre-hooks per prompt n={nb}": lambda: hf_hooks_per_prompt(pair, events, b),
    }
    if not args.no_nnsight:
        lms = make_nnsight(pair)
        contenders[f"nnsight per prompt n={nb}"] = lambda: nnsight_per_prompt(lms, events, b)
    base = measure_interleaved(contenders, max(1, args.repeats - 1))
    timings += base
    ratios[f"HF hooks per prompt / crosspatch (n={nb})"] = paired_ratio(base[2], base[0])
    ratios[f"HF hooks per prompt / floor (n={nb})"] = paired_ratio(base[2], base[1])
    if not args.no_nnsight:
        ratios[f"nnsight per prompt / crosspatch (n={nb})"] = paired_ratio(base[3], base[0])
        ratios[f"nnsight per prompt / floor (n={nb})"] = paired_ratio(base[3], base[1])
    report(
        (
            f"2x2 cross-patch, organism {args.organism}"
            if args.organism
            else f"2x2 cross-patch, random Llama {args.layers}x{args.d_model}, vocab {args.vocab}"
        )
        + f", boundary {b}, {args.device} {args.dtype}",
        timings,
        ratios,
        extra=extra,
        out=args.json,
    )


if __name__ == "__main__":
    main()
