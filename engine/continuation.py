"""Constrained continuation (method §6.2): does the 2x2 grow when the divergent token is followed by a short tail?

For each first-divergence event (context x = raw prompt + shared prefix, targets t_IT, t_PT):
  1. Candidates. The descendant candidate is t_IT followed by IT's greedy tail (real-token mask, cut
     before EOS); the base candidate is t_PT followed by PT's greedy tail.
  2. Teacher forcing. Each candidate runs through the four hybrid cells exactly as the one-token 2x2 does
     (upstream = residual entering the boundary block at every position, recomputed on x + candidate;
     late stack = the other model's blocks b..L-1; one fixed readout, common-IT by default) and every
     candidate token gets its log-probability (fp32 log-softmax over the real-token mask).
  3. Sequence margin per cell: C_N = log p(descendant candidate[: N + 1]) - log p(base candidate[: N + 1]);
     tail-only C_N leaves out the first (forced) token's term. The interaction is the 2x2 contrast of C_N.
     At N = 0, C_0 = logit(t_IT) - logit(t_PT) (one softmax normaliser): the one-token 2x2.

Attention is causal, so one teacher-forced pass at the longest N gives every shorter N: the log-probability
of token k never sees tokens after k. An event counts at N when both candidates' tails have >= N tokens.

Controls (INFERRED from the paper's names, §6.2 "N=8 controls"):
  * `same_forced`: the base candidate's tail is also the descendant's greedy tail (IT continuing after t_PT):
    both tails come from one model, only the forced tokens differ.
  * `shuffled_tail`: the descendant candidate's tail (of the longest N) in a seeded random order (per
    prompt), base candidate unchanged: how much of C_N needs a coherent descendant tail. Shorter N take
    the first N tokens of that shuffled tail.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from crosspatch.engine.adapters import ArchAdapter, positions_from_mask
from crosspatch.engine.baselines import greedy_rollouts
from crosspatch.engine.divergence import DivergenceEvent, eos_ids, left_pad, real_token_mask
from crosspatch.engine.pairs import ModelPair, check_readout
from crosspatch.engine.recipe import single_boundary
from crosspatch.engine.results import (
    CONTINUATION_CELL_KEYS,
    CONTINUATION_SCHEMA,
    CONTINUATION_SUMMARY_SCHEMA,
)
from crosspatch.engine.stats import bootstrap_ci

DEFAULT_NS: tuple[int, ...] = (0, 1, 2, 4, 8)
VARIANTS: tuple[str, ...] = ("native", "same_forced", "shuffled_tail")
CELL_KEYS = CONTINUATION_CELL_KEYS


@dataclass(frozen=True)
class Candidates:
    """One event's candidate pairs per variant, each the forced token followed by its full tail."""

    event: DivergenceEvent
    pairs: dict[str, tuple[list[int], list[int]]]  # variant -> (descendant candidate, base candidate)


def _shuffled(tail: list[int], seed: int, prompt_id: str) -> list[int]:
    """`tail` in a seeded order that depends only on (seed, prompt id), never on batching."""
    rng = np.random.default_rng([seed, zlib.crc32(prompt_id.encode())])
    return [tail[i] for i in rng.permutation(len(tail))]


def build_candidates(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    max_n: int,
    variants: Sequence[str] = VARIANTS,
    seed: int = 23,
) -> list[Candidates]:
    """Greedy tails of length <= `max_n` for each diverged event's candidates (batched per model)."""
    events = [e for e in events if e.diverged]
    if not events:
        return []
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0

    def tails(role: str, firsts: list[int]) -> list[list[int]]:
        if max_n == 0:
            return [[] for _ in events]
        model, tok = (pair.pt, pair.tokenizer) if role == "pt" else (pair.it, pair.it_tokenizer)
        allowed, eos = real_token_mask(model, tok), set(eos_ids(model, tok))
        prompts = [[*e.input_ids, t] for e, t in zip(events, firsts, strict=True)]
        return greedy_rollouts(model, allowed, eos, prompts, max_n, pad)

    it_tails = tails("it", [e.t_it for e in events])
    pt_tails = tails("pt", [e.t_pt for e in events])
    same_tails = tails("it", [e.t_pt for e in events]) if "same_forced" in variants else None
    out = []
    for i, e in enumerate(events):
        pairs: dict[str, tuple[list[int], list[int]]] = {}
        if "native" in variants:
            pairs["native"] = ([e.t_it, *it_tails[i]], [e.t_pt, *pt_tails[i]])
        if same_tails is not None:
            pairs["same_forced"] = ([e.t_it, *it_tails[i]], [e.t_pt, *same_tails[i]])
        if "shuffled_tail" in variants:
            pairs["shuffled_tail"] = (
                [e.t_it, *_shuffled(it_tails[i], seed, e.prompt_id)],
                [e.t_pt, *pt_tails[i]],
            )
        out.append(Candidates(event=e, pairs=pairs))
    return out


def _log_probs(adapter: ArchAdapter, final: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`[batch, k, d_model]` final residuals -> `[batch, k, vocab]` fp32 log-probs over the real-token mask."""
    h = adapter.final_norm_fp32(final)  # [batch, k, d_model] fp32
    logits = h @ adapter.unembed.weight.float().T  # [batch, k, vocab]
    bias = getattr(adapter.unembed, "bias", None)
    if bias is not None:
        logits = logits + bias.float()
    if adapter.softcap is not None:
        logits = torch.tanh(logits / adapter.softcap) * adapter.softcap
    neg = torch.where(allowed.to(logits.device), 0.0, float("-inf"))[: logits.shape[-1]]  # [vocab]
    return torch.log_softmax(logits + neg, dim=-1)


@torch.no_grad()
def token_log_probs(
    pair: ModelPair,
    contexts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[int]],
    boundary: int,
    readout: str = "it",
) -> dict[tuple[str, str], list[np.ndarray]]:
    """Per cell (upstream, late): for each row, `[len(candidate)]` log p of each candidate token given
    its context and the candidate tokens before it, read through `readout` ('it', 'pt' or 'own')."""
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    seqs = [list(c) + list(s[:-1]) for c, s in zip(contexts, candidates, strict=True)]
    ids, attn = left_pad(seqs, pad, pair.pt_adapter.device)  # [batch, seq]
    lengths = [len(s) for s in candidates]
    k = max(lengths)
    position_ids = positions_from_mask(attn)
    ctx, captured, final = {}, {}, {}
    for role in ("pt", "it"):
        adapter = pair.adapter(role)
        resid = adapter.embed(ids, position_ids)  # [batch, seq, d_model]
        ctx[role] = adapter.context(resid, attn, position_ids)
        final[(role, role)], caps = adapter.run_layers(resid, ctx[role], capture_inputs=[boundary])
        captured[role] = caps[boundary]  # [batch, seq, d_model]
    for up, late in (("pt", "it"), ("it", "pt")):
        final[(up, late)] = pair.adapter(late).run_layers(captured[up], ctx[late], start=boundary)[0]
    masks = {
        role: real_token_mask(m, t)
        for role, m, t in (("pt", pair.pt, pair.tokenizer), ("it", pair.it, pair.it_tokenizer))
    }
    targets = torch.full((len(seqs), k), pad, dtype=torch.long)  # [batch, k], right-aligned
    for row, s in enumerate(candidates):
        targets[row, k - len(s) :] = torch.tensor(list(s), dtype=torch.long)
    targets = targets.to(ids.device)
    out: dict[tuple[str, str], list[np.ndarray]] = {}
    for cell, h in final.items():
        role = cell[1] if readout == "own" else readout
        lp = _log_probs(pair.adapter(role), h[:, -k:], masks[role])  # [batch, k, vocab]
        picked = lp.gather(-1, targets[..., None])[..., 0].double().cpu().numpy()  # [batch, k]
        out[cell] = [picked[row, k - n :] for row, n in enumerate(lengths)]
    return out


def continuation_table(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    ns: Sequence[int] = DEFAULT_NS,
    boundary: int | float | str | None = None,
    readout: str = "it",
    variants: Sequence[str] = VARIANTS,
    batch_size: int = 16,
    seed: int = 23,
) -> pa.Table:
    """One row per diverged event x variant x N at which both candidates have N tail tokens (schema above)."""
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 0:
        raise ValueError(f"ns must be a non-empty list of tail lengths >= 0, got {list(ns)}")
    check_readout(readout)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    b = single_boundary(pair, boundary)
    rows: list[dict] = []
    diverged = sorted((e for e in events if e.diverged), key=lambda e: len(e.input_ids))
    for start in range(0, len(diverged), batch_size):
        batch = diverged[start : start + batch_size]
        cands = build_candidates(pair, batch, ns[-1], variants, seed)
        for variant in variants:
            contexts = [c.event.input_ids for c in cands for _ in range(2)]
            seqs = [s for c in cands for s in c.pairs[variant]]
            lps = token_log_probs(pair, contexts, seqs, b, readout)
            for i, c in enumerate(cands):
                mine = {cell: (v[2 * i], v[2 * i + 1]) for cell, v in lps.items()}  # (descendant, base)
                rows += _rows(pair, c, variant, ns, b, readout, mine)
    if not rows:
        return CONTINUATION_SCHEMA.empty_table()
    table = pa.Table.from_pylist(rows, schema=CONTINUATION_SCHEMA)
    return table.sort_by([("prompt_id", "ascending"), ("variant", "ascending"), ("n", "ascending")])


def _rows(
    pair: ModelPair,
    cand: Candidates,
    variant: str,
    ns: Sequence[int],
    boundary: int,
    readout: str,
    lps: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
) -> list[dict]:
    """Rows of one event and variant at every N both candidates reach."""
    e = cand.event
    it_seq, pt_seq = cand.pairs[variant]
    out = []
    for n in ns:
        if min(len(it_seq), len(pt_seq)) < n + 1:
            continue
        c = {
            k: float(lps[cell][0][: n + 1].sum() - lps[cell][1][: n + 1].sum())
            for cell, k in CELL_KEYS.items()
        }
        t = {
            k: float(lps[cell][0][1 : n + 1].sum() - lps[cell][1][1 : n + 1].sum())
            for cell, k in CELL_KEYS.items()
        }
        out.append(
            {
                "family": pair.family,
                "pair_id": pair.pair_id,
                "prompt_id": e.prompt_id,
                "category": e.category,
                "position": e.position,
                "boundary": boundary,
                "readout": readout,
                "variant": variant,
                "n": n,
                **{f"c_{k}": v for k, v in c.items()},
                **{f"tail_{k}": v for k, v in t.items()},
                "interaction": _contrast(c),
                "tail_interaction": _contrast(t),
                "it_candidate": it_seq[: n + 1],
                "pt_candidate": pt_seq[: n + 1],
                "it_candidate_text": pair.it_tokenizer.decode(it_seq[: n + 1]),
                "pt_candidate_text": pair.tokenizer.decode(pt_seq[: n + 1]),
            }
        )
    return out


def _contrast(c: dict[str, float]) -> float:
    """[C(IT up, IT late) - C(IT up, PT late)] - [C(PT up, IT late) - C(PT up, PT late)]."""
    return (c["itup_itlate"] - c["itup_ptlate"]) - (c["ptup_itlate"] - c["ptup_ptlate"])


def summarize_continuation(table: pa.Table, n_resamples: int = 2000, seed: int = 23) -> pa.Table:
    """Mean [percentile bootstrap CI over prompts] of C_N and tail-only C_N per pair x variant x N."""
    rows = []
    cols = table.select(["pair_id", "variant", "n", "interaction", "tail_interaction"]).to_pylist()
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in cols:
        groups.setdefault((r["pair_id"], r["variant"], r["n"]), []).append(r)
    for (pair_id, variant, n), group in sorted(groups.items()):
        for stat in ("interaction", "tail_interaction"):
            if stat == "tail_interaction" and n == 0:
                continue
            mean, lo, hi = bootstrap_ci([g[stat] for g in group], n_resamples, seed)
            rows.append(
                {
                    "pair_id": pair_id,
                    "variant": variant,
                    "n": n,
                    "statistic": stat,
                    "mean": mean,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n_events": len(group),
                }
            )
    return pa.Table.from_pylist(rows, schema=CONTINUATION_SUMMARY_SCHEMA)
