"""Selection baselines of the 2x2 (method section 4.3): is the interaction special to first divergences?

The same 2x2 is scored on three other kinds of events from the same prompts:
  random_pt_rollout / random_it_rollout  local disagreements inside a greedy rollout of one model: up to
      `n_tries` random prefix lengths k in 1..len(rollout) (never the first-divergence step) are tried in a
      seeded random order, and the first k where PT's and IT's top-1 next tokens differ is scored with
      those two tokens. Their mean is the source-balanced random baseline.
  pre_divergence  for first divergences at position s >= 3, the shared prefix cut at j ~ U{0..s-2},
      scored with the *future* first-divergence pair (t_PT, t_IT): the same tokens before either model
      wanted them.
Each condition's interaction is reported with its prompt-bootstrap CI and as a share of the
first-divergence interaction (ratio of means over shared prompt resamples). The method's Core-small values:
first divergence +1.794 (100%), source-balanced random +1.005 (56%), pre-divergence +0.059 (3%).

The native-history check (section 4.6) reuses the rollouts: after h tokens (default 4, 8, 16) of one
model's own greedy history, the events where PT and IT disagree get the same 2x2, averaged within prompt.
Its diagonal no-op deltas come from `engine.noop` (not recomputed here).

Forward work: one cached greedy rollout per model and prompt (`max_new_tokens`, default 64), one plain
forward of each model over each rollout (top-1s at every prefix length at once), then the 2x2 per condition.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import torch
from transformers import DynamicCache, PreTrainedModel

from crosspatch.engine.adapters import positions_from_mask
from crosspatch.engine.control_schemas import BASELINE_CELLS_SCHEMA, BASELINE_SUMMARY_SCHEMA
from crosspatch.engine.crosspatch import crosspatch
from crosspatch.engine.divergence import DIVERGED, DivergenceEvent, eos_ids, left_pad, real_token_mask
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.stats import bootstrap_ci

CONDITIONS: tuple[str, ...] = ("first_divergence", "random_pt_rollout", "random_it_rollout", "pre_divergence")
BALANCED = "random_balanced"  # summary-only row: mean of the two rollout arms
DEFAULT_HORIZONS: tuple[int, ...] = (4, 8, 16)


@dataclass(frozen=True)
class ConditionSummary:
    """One condition's interaction and its share of the first-divergence interaction, with CIs."""

    condition: str
    n: int
    interaction: float
    ci_low: float
    ci_high: float
    share: float
    share_ci_low: float
    share_ci_high: float


def _cache_kwarg(model: PreTrainedModel) -> str:
    """transformers renamed `past_key_values` to `cache`; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_rollouts(
    model: PreTrainedModel,
    allowed: torch.Tensor,
    eos: set[int],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
) -> list[list[int]]:
    """Cached greedy continuations of `prompts` (masked argmax), each cut before its first EOS."""
    device = model.device
    ids, attn = left_pad(prompts, pad_id, device)
    pos = positions_from_mask(attn)
    neg = torch.where(allowed, 0.0, float("-inf")).to(device)  # [vocab]
    cache, kw = DynamicCache(config=model.config), _cache_kwarg(model)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{kw: cache})
        nxt = (logits.logits[:, -1].float() + neg[: logits.logits.shape[-1]]).argmax(-1)  # [batch]
        for row, t in enumerate(nxt.tolist()):  # one sync per step
            if not done[row]:
                done[row] = t in eos
                if not done[row]:
                    out[row].append(t)
        if all(done):
            break
        ids = nxt[:, None]  # [batch, 1]
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
    return out


@torch.no_grad()
def rollout_top1(
    pair: ModelPair, prompts: Sequence[Sequence[int]], rollouts: Sequence[Sequence[int]], pad_id: int
) -> list[tuple[list[int], list[int]]]:
    """Per rollout: PT's and IT's masked top-1 after every prefix length k = 1..len(rollout)."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, rollouts, strict=True)]
    ids, attn = left_pad(seqs, pad_id, pair.pt_adapter.device)
    top: dict[str, torch.Tensor] = {}
    for role, tok in (("pt", pair.tokenizer), ("it", pair.it_tokenizer)):
        model, adapter = (pair.pt, pair.pt_adapter) if role == "pt" else (pair.it, pair.it_adapter)
        logits = adapter.forward_logits(ids, attn).float()  # [batch, seq, vocab]
        neg = torch.where(real_token_mask(model, tok), 0.0, float("-inf")).to(logits.device)
        top[role] = (logits + neg[: logits.shape[-1]]).argmax(-1).cpu()  # [batch, seq]
    width = ids.shape[1]
    out = []
    for row, r in enumerate(rollouts):
        # prefix length k ends at column width - len(r) - 1 + k (left padding aligns the last token)
        cols = [width - len(r) - 1 + k for k in range(1, len(r) + 1)]
        out.append((top["pt"][row, cols].tolist(), top["it"][row, cols].tolist()))
    return out


def _rng(seed: int, prompt_id: str, arm: str) -> np.random.Generator:
    """A per-(prompt, arm) generator: choices do not depend on batching or on the other prompts."""
    return np.random.default_rng([seed, zlib.crc32(f"{arm}\0{prompt_id}".encode())])


def _rollout_tops(
    pair: ModelPair, events: Sequence[DivergenceEvent], source: str, max_new_tokens: int, batch_size: int
) -> Iterator[tuple[DivergenceEvent, list[int], list[int], list[int]]]:
    """(event, `source`'s greedy rollout, PT top-1s, IT top-1s after each prefix length) per non-empty rollout."""
    if source not in ("pt", "it"):
        raise ValueError(f"source must be 'pt' or 'it', not {source!r}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    model = pair.pt if source == "pt" else pair.it
    tok = pair.tokenizer if source == "pt" else pair.it_tokenizer
    allowed, eos = real_token_mask(model, tok), set(eos_ids(model, tok))
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    for start in range(0, len(events), batch_size):
        batch = list(events[start : start + batch_size])
        prompts = [e.prompt_ids for e in batch]
        rollouts = greedy_rollouts(model, allowed, eos, prompts, max_new_tokens, pad)
        keep = [i for i, r in enumerate(rollouts) if r]
        tops = rollout_top1(pair, [prompts[i] for i in keep], [rollouts[i] for i in keep], pad)
        for i, (top_pt, top_it) in zip(keep, tops, strict=True):
            yield batch[i], rollouts[i], top_pt, top_it


def random_disagreements(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    source: str,
    max_new_tokens: int = 64,
    n_tries: int = 8,
    seed: int = 0,
    batch_size: int = 16,
) -> list[DivergenceEvent]:
    """At most one random local disagreement per prompt from `source`'s ("pt" or "it") greedy rollout."""
    if n_tries < 1:
        raise ValueError("n_tries must be >= 1")
    found: list[DivergenceEvent] = []
    for e, r, top_pt, top_it in _rollout_tops(pair, events, source, max_new_tokens, batch_size):
        candidates = [k for k in range(1, len(r) + 1) if not (e.diverged and k == e.position)]
        for k in _rng(seed, e.prompt_id, source).permutation(candidates)[:n_tries].tolist():
            if top_pt[k - 1] != top_it[k - 1]:
                found.append(_event(pair, e, r[:k], top_pt[k - 1], top_it[k - 1]))
                break
    return found


def native_history_events(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    source: str,
    horizons: Sequence[int] = DEFAULT_HORIZONS,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[DivergenceEvent]:
    """Native-history check (section 4.6): after h tokens of `source`'s own greedy history, keep the events
    where PT's and IT's next tokens differ (one per prompt and horizon; no shared-history requirement)."""
    if not horizons or min(horizons) < 1:
        raise ValueError(f"horizons must be positive token counts, got {list(horizons)}")
    found: list[DivergenceEvent] = []
    budget = max(max_new_tokens, max(horizons))
    for e, r, top_pt, top_it in _rollout_tops(pair, events, source, budget, batch_size):
        for h in sorted(set(horizons)):
            if h <= len(r) and top_pt[h - 1] != top_it[h - 1]:
                found.append(_event(pair, e, r[:h], top_pt[h - 1], top_it[h - 1]))
    return found


def native_history_cells(
    pair: ModelPair,
    native: Sequence[DivergenceEvent],
    source: str,
    boundary: int | None = None,
    readout: str = "it",
    batch_size: int = 16,
) -> pa.Table:
    """The 2x2 on `native_history_events(..., source, ...)`; condition 'native_<source>_history', position = horizon."""
    return with_condition(
        crosspatch(pair, native, boundary, (readout,), batch_size), f"native_{source}_history"
    )


def with_condition(cells: pa.Table, condition: str) -> pa.Table:
    """A cells table with its `condition` column, as `BASELINE_CELLS_SCHEMA` (the 2x2's no-op metadata dropped)."""
    return cells.append_column("condition", pa.array([condition] * cells.num_rows, pa.string())).cast(
        BASELINE_CELLS_SCHEMA
    )


def clustered_interaction(
    cells: pa.Table, n_resamples: int = 2000, seed: int = 23
) -> tuple[float, float, float, int, int]:
    """(mean, lo, hi, n_events, n_prompts): events averaged within prompt, then a bootstrap over prompts."""
    d = cells.select(["prompt_id", "interaction"]).to_pydict()
    if not d["prompt_id"]:
        raise ValueError("no events to summarize")
    per_prompt: dict[str, list[float]] = {}
    for p, v in zip(d["prompt_id"], d["interaction"], strict=True):
        per_prompt.setdefault(p, []).append(v)
    means = np.array([np.mean(v) for v in per_prompt.values()])  # [prompts]
    mean, lo, hi = bootstrap_ci(means, n_resamples, seed)
    return mean, lo, hi, len(d["prompt_id"]), len(means)


def pre_divergence_events(
    pair: ModelPair, events: Sequence[DivergenceEvent], seed: int = 0, min_position: int = 3
) -> list[DivergenceEvent]:
    """For first divergences at position s >= `min_position`: the prefix cut at j ~ U{0..s-2}, future tokens."""
    out = []
    for e in events:
        if e.diverged and e.position >= min_position:
            j = int(_rng(seed, e.prompt_id, "pre").integers(0, e.position - 1))  # 0..s-2
            out.append(_event(pair, e, e.prefix_ids[:j], e.t_pt, e.t_it))
    return out


def _event(
    pair: ModelPair, e: DivergenceEvent, prefix: Sequence[int], t_pt: int, t_it: int
) -> DivergenceEvent:
    """A scored event on `e`'s prompt with `prefix` generated tokens and the pair (t_pt, t_it)."""
    tok = pair.tokenizer
    return replace(
        e,
        prefix_ids=list(prefix),
        diverged=True,
        reason=DIVERGED,
        position=len(prefix),
        t_pt=int(t_pt),
        t_it=int(t_it),
        prefix_text=tok.decode(list(prefix)),
        t_pt_text=tok.decode([int(t_pt)]),
        t_it_text=tok.decode([int(t_it)]),
    )


def baseline_cells(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    boundary: int | None = None,
    readout: str = "it",
    max_new_tokens: int = 64,
    n_tries: int = 8,
    seed: int = 0,
    batch_size: int = 16,
) -> pa.Table:
    """The 2x2 of every condition for the first-divergence `events` (one per prompt), `condition` column added."""
    if len({e.prompt_id for e in events}) != len(events):
        raise ValueError("selection baselines need one first-divergence event per prompt (prompt ids repeat)")
    conditions = {
        "first_divergence": [e for e in events if e.diverged],
        "random_pt_rollout": random_disagreements(
            pair, events, "pt", max_new_tokens, n_tries, seed, batch_size
        ),
        "random_it_rollout": random_disagreements(
            pair, events, "it", max_new_tokens, n_tries, seed, batch_size
        ),
        "pre_divergence": pre_divergence_events(pair, events, seed),
    }
    parts = []
    for condition, scored in conditions.items():
        parts.append(with_condition(crosspatch(pair, scored, boundary, (readout,), batch_size), condition))
    return pa.concat_tables(parts)


def summarize_baselines(
    cells: pa.Table, n_resamples: int = 2000, seed: int = 23
) -> tuple[list[ConditionSummary], pa.Table]:
    """Per condition (and the source-balanced random mean): interaction, CI, share of first divergence.

    Prompts are the resampling unit; every condition's mean and the shares use the same prompt resamples.
    """
    keys = {}
    for key in ("family", "pair_id", "boundary", "readout"):
        values = set(cells.column(key).to_pylist())
        if len(values) != 1:
            raise ValueError(f"baseline cells must hold exactly one {key} (found {len(values)})")
        keys[key] = values.pop()
    d = cells.select(["prompt_id", "condition", "interaction"]).to_pydict()
    prompts = sorted(set(d["prompt_id"]))
    row = {p: i for i, p in enumerate(prompts)}
    values = np.full((len(prompts), len(CONDITIONS)), np.nan)  # [prompts, conditions]
    for p, c, v in zip(d["prompt_id"], d["condition"], d["interaction"], strict=True):
        if c not in CONDITIONS:
            raise ValueError(f"unknown condition {c!r}; expected one of {', '.join(CONDITIONS)}")
        values[row[p], CONDITIONS.index(c)] = v
    present = ~np.isnan(values)
    filled = np.where(present, values, 0.0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(prompts), size=(n_resamples, len(prompts)))  # [R, prompts]
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = filled[idx].sum(axis=1) / present[idx].sum(axis=1)  # [R, conditions]
        point = filled.sum(axis=0) / present.sum(axis=0)  # [conditions]
    arms = [CONDITIONS.index("random_pt_rollout"), CONDITIONS.index("random_it_rollout")]
    point = np.append(point, point[arms].mean())
    boot = np.column_stack([boot, boot[:, arms].mean(axis=1)])  # [R, conditions + 1]
    counts = [*present.sum(axis=0).tolist(), int(present[:, arms].any(axis=1).sum())]
    first = CONDITIONS.index("first_divergence")
    out, rows = [], []
    for i, name in enumerate((*CONDITIONS, BALANCED)):
        ci = _quantiles(boot[:, i])
        with np.errstate(invalid="ignore", divide="ignore"):
            share = point[i] / point[first]
            share_ci = _quantiles(boot[:, i] / boot[:, first])
        s = ConditionSummary(name, int(counts[i]), float(point[i]), *ci, float(share), *share_ci)
        out.append(s)
        rows.append({**keys, **s.__dict__})
    return out, pa.Table.from_pylist(rows, schema=BASELINE_SUMMARY_SCHEMA)


def _quantiles(x: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the finite resamples (nan if any resample is undefined)."""
    if not np.isfinite(x).all():
        return float("nan"), float("nan")
    lo, hi = np.quantile(x, [0.025, 0.975])
    return float(lo), float(hi)
