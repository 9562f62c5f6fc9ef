"""First divergence: crosspatch's lockstep early-stopping decoder vs `generate` to 128 tokens on both models.

    python bench/bench_divergence.py --layers 12 --d-model 256 --prompts 64 --batch-size 16

- crosspatch: `engine.divergence.find_divergences` (PT and IT decode in lockstep with a KV cache, batched,
  a prompt leaves its batch at its first disagreement; the batch stops when every prompt has).
- baseline: what a researcher would write with HF: batched `generate` (left padding, greedy, the same
  real-token mask through a `LogitsProcessor`) to 128 new tokens on PT and on IT, then the first index
  where the two continuations differ.
Both must give the same events (position, t_pt, t_it, shared prefix, reason); the script asserts it.
The random IT is PT plus `--it-scale` noise, chosen so first divergences spread over ~0-30 tokens.
"""

from __future__ import annotations

import statistics
from collections import Counter

import torch
from harness import base_args, measure_interleaved, paired_ratio, report, setup, shape_args
from transformers import LogitsProcessor, LogitsProcessorList

from crosspatch.engine.divergence import (
    DIVERGED,
    EOS_BEFORE_DIVERGENCE,
    NO_DIVERGENCE_IN_BUDGET,
    DivergenceEvent,
    encode_prompt,
    eos_ids,
    find_divergences,
    left_pad,
    real_token_mask,
)

# Tuned on the default 12x256 pair (seed 0): first divergences spread over ~0-30 tokens.
DEFAULT_IT_SCALE = 0.0002


class RealTokenMask(LogitsProcessor):
    """Greedy may only pick real tokens (the engine's `real_token_mask`), as a `generate` user would add."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.neg = torch.where(mask, 0.0, float("-inf"))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        neg = self.neg.to(scores.device)
        return scores.float() + neg[: scores.shape[-1]]


@torch.no_grad()
def generate_continuations(pair, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int):
    """`{role: [continuation ids]}`: greedy `generate` on each model, `max_new_tokens` new tokens."""
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    out: dict[str, list[list[int]]] = {"pt": [], "it": []}
    for role, model, tok in (("pt", pair.pt, pair.tokenizer), ("it", pair.it, pair.it_tokenizer)):
        procs = LogitsProcessorList([RealTokenMask(real_token_mask(model, tok))])
        eos = eos_ids(model, tok)
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            ids, attn = left_pad(chunk, pad, model.device)
            seqs = model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                logits_processor=procs,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            out[role] += seqs[:, ids.shape[1] :].tolist()
    return out


def compare(prompts, prompt_ids, conts, eos: set[int], max_new_tokens: int) -> list[DivergenceEvent]:
    """The first index where PT's and IT's continuations differ (EOS agreed first: no event)."""
    events = []
    for p, ids, a_seq, c_seq in zip(prompts, prompt_ids, conts["pt"], conts["it"], strict=True):
        ev = DivergenceEvent(prompt_id=p.id, category=p.category, prompt_ids=ids, prompt_text=p.text)
        for k in range(max_new_tokens):
            a = a_seq[k] if k < len(a_seq) else None
            c = c_seq[k] if k < len(c_seq) else None
            if a != c:
                ev.diverged, ev.reason, ev.position, ev.t_pt, ev.t_it = True, DIVERGED, k, a, c
                break
            if a in eos:
                ev.reason = EOS_BEFORE_DIVERGENCE
                break
            ev.prefix_ids.append(a)
        else:
            ev.reason = NO_DIVERGENCE_IN_BUDGET
        events.append(ev)
    return events


def generate_then_compare(pair, prompts, max_new_tokens: int = 128, batch_size: int = 16):
    prompt_ids = [encode_prompt(pair, p.text) for p in prompts]
    conts = generate_continuations(pair, prompt_ids, max_new_tokens, batch_size)
    eos = set(eos_ids(pair.pt, pair.tokenizer)) | set(eos_ids(pair.it, pair.it_tokenizer))
    return compare(prompts, prompt_ids, conts, eos, max_new_tokens)


def key(e: DivergenceEvent) -> tuple:
    return (e.prompt_id, e.diverged, e.reason, e.position, e.t_pt, e.t_it, tuple(e.prefix_ids))


def assert_same_events(ours: list[DivergenceEvent], theirs: list[DivergenceEvent]) -> None:
    bad = [(a, b) for a, b in zip(ours, theirs, strict=True) if key(a) != key(b)]
    if bad:
        a, b = bad[0]
        raise AssertionError(
            f"{len(bad)}/{len(ours)} events differ; first: {a.prompt_id} crosspatch "
            f"(pos {a.position}, {a.t_pt}/{a.t_it}, {a.reason}) vs generate "
            f"(pos {b.position}, {b.t_pt}/{b.t_it}, {b.reason})"
        )


def position_summary(events: list[DivergenceEvent]) -> str:
    pos = sorted(e.position for e in events if e.diverged)
    reasons = Counter(e.reason for e in events)
    if not pos:
        return f"no divergences; {dict(reasons)}"
    q = statistics.quantiles(pos, n=4) if len(pos) > 1 else [pos[0]] * 3
    return f"min {pos[0]}, quartiles {q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f}, max {pos[-1]}; {dict(reasons)}"


def main() -> None:
    parser = base_args(__doc__.splitlines()[0])
    shape_args(parser, batch_size=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--it-scale", type=float, default=DEFAULT_IT_SCALE)
    parser.add_argument("--probe", action="store_true", help="only print the divergence positions")
    args, pair, prompts = setup(parser)
    n, bs = args.max_new_tokens, args.batch_size
    ours = find_divergences(pair, prompts, max_new_tokens=n, batch_size=bs)
    print(f"first-divergence positions: {position_summary(ours)}")
    if args.probe:
        return
    assert_same_events(ours, generate_then_compare(pair, prompts, n, bs))
    timings = measure_interleaved(
        {
            f"crosspatch find_divergences bs={bs}": lambda: find_divergences(pair, prompts, n, bs),
            f"generate {n} x2 then compare bs={bs}": lambda: generate_then_compare(pair, prompts, n, bs),
        },
        args.repeats,
        warmup=0,  # the equality check above warmed both up
    )
    report(
        f"first divergence, random Llama {args.layers}x{args.d_model} (IT = PT + {args.it_scale} noise), "
        f"{args.prompts} prompts, {args.device} {args.dtype}",
        timings,
        {"generate-then-compare / crosspatch": paired_ratio(timings[1], timings[0])},
        extra={"events equal": True, "positions": position_summary(ours)},
        out=args.json,
    )


if __name__ == "__main__":
    main()
