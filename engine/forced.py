"""Forced-token scoring (method §6.1): does the divergent token change the final answer?

At each first-divergence event (context x = raw prompt + shared prefix) four first tokens are forced:
  * `it`: the descendant-preferred token t_IT;       * `pt`: the base-preferred token t_PT;
  * `rank_matched`: the token one rank below t_PT in IT's masked next-token ranking (t_IT is rank 1), i.e. a
    token the descendant finds about as plausible as the base's (INFERRED: the paper names, not defines, it);
  * `class_matched`: IT's highest-ranked token of t_IT's token class (number, punctuation, capitalised word,
    lower-case word, other; with its leading-space flag), other than t_IT and t_PT.
Alternatives never use EOS, t_IT or t_PT. Then the descendant (IT) continues greedily (real-token mask, stop at
EOS; `max_new_tokens` by category: CONTENT-REASON 256, SAFETY 128, GOV-CONV 128, GOV-FORMAT 96, else 128),
all branches of a batch of events in one cached decode. Each branch's continuation is scored suffix-only (the
forced token excluded; the primary view) and with the token, by `engine.validators`.

The headline is the descendant-minus-base success contrast per category, success(it) - success(pt) per event,
with a percentile bootstrap over events (prompt clusters) per pair and a family-balanced row (unweighted mean
of the families' means; each bootstrap draw resamples events within every family), 1000 draws as the method.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from crosspatch.engine.adapters import positions_from_mask
from crosspatch.engine.baselines import greedy_rollouts
from crosspatch.engine.divergence import DivergenceEvent, eos_ids, left_pad, real_token_mask
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.prompts import PromptRecord
from crosspatch.engine.results import FORCED_SCHEMA, FORCED_SUMMARY_SCHEMA
from crosspatch.engine.streams import gathered, whole
from crosspatch.engine.validators import score

BRANCHES: tuple[str, ...] = ("it", "pt", "rank_matched", "class_matched")
METHOD_BUDGETS: dict[str, int] = {"CONTENT-REASON": 256, "SAFETY": 128, "GOV-CONV": 128, "GOV-FORMAT": 96}
DEFAULT_BUDGET = 128


def token_class(text: str) -> str:
    """A coarse class of a decoded token: `number`, `punct`, `upper`, `lower`, `space`, `other`,
    prefixed `_` when the token starts with whitespace (the BPE leading-space flag)."""
    lead = "_" if text[:1].isspace() else ""
    core = text.strip()
    if not core:
        return "space"
    if core.isdigit():
        kind = "number"
    elif all(
        unicodedata.category(c).startswith("P") or unicodedata.category(c).startswith("S") for c in core
    ):
        kind = "punct"
    elif core[0].isalpha() and core[0].isupper():
        kind = "upper"
    elif core[0].isalpha():
        kind = "lower"
    else:
        kind = "other"
    return lead + kind


@torch.no_grad()
def alternatives(pair: ModelPair, events: Sequence[DivergenceEvent]) -> list[dict[str, tuple[int, int]]]:
    """Per event: branch -> (forced token, its rank in IT's masked ranking at the event), for every branch."""
    allowed = real_token_mask(pair.it, pair.it_tokenizer)
    eos = set(eos_ids(pair.it, pair.it_tokenizer))
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    ids, attn = left_pad([e.input_ids for e in events], pad, pair.it_adapter.device)
    adapter = pair.it_adapter
    position_ids = positions_from_mask(attn)
    resid = adapter.embed(ids, position_ids)  # [batch, seq, d_model]
    final, _ = adapter.run_layers(resid, adapter.context(resid, attn, position_ids))
    logits = adapter.readout(final[:, -1]).float()  # [batch, vocab]
    logits = logits.masked_fill(~allowed.to(logits.device)[: logits.shape[-1]], float("-inf"))
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices.cpu().tolist()  # [batch, vocab]
    n_allowed = int(allowed.sum())
    out = []
    for e, ranking in zip(events, order, strict=True):
        ranking = ranking[:n_allowed]
        rank = {t: r + 1 for r, t in enumerate(ranking)}
        taken = {e.t_it, e.t_pt} | eos
        usable = [t for t in ranking if t not in taken]
        below_pt = [t for t in ranking[rank.get(e.t_pt, len(ranking)) :] if t not in taken]
        rank_matched = below_pt[0] if below_pt else usable[0]
        want = token_class(pair.it_tokenizer.decode([e.t_it]))
        same = [t for t in usable if token_class(pair.it_tokenizer.decode([t])) == want]
        class_matched = same[0] if same else usable[0]
        chosen = {"it": e.t_it, "pt": e.t_pt, "rank_matched": rank_matched, "class_matched": class_matched}
        out.append({b: (t, rank.get(t, -1)) for b, t in chosen.items()})
    return out


def budget_for(category: str, budgets: Mapping[str, int] | None = None) -> int:
    """max_new_tokens of a category (the method's table, overridable; others `DEFAULT_BUDGET`)."""
    table = {**METHOD_BUDGETS, **(budgets or {})}
    return int(table.get(category, table.get("*", DEFAULT_BUDGET)))


def iter_forced(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    prompts: Sequence[PromptRecord],
    branches: Sequence[str] = BRANCHES,
    budgets: Mapping[str, int] | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
) -> Iterator[pa.Table]:
    """Stream the forced-token table (one row per diverged event x branch) batch by batch of events."""
    unknown = [b for b in branches if b not in BRANCHES]
    if unknown or not branches or "it" not in branches or "pt" not in branches:
        raise ValueError(
            f"branches must include 'it' and 'pt' and come from {', '.join(BRANCHES)}; got {branches}"
        )
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    for category, value in (budgets or {}).items():
        if int(value) < 1:
            raise ValueError(f"budget of {category!r} must be >= 1, got {value}")
    records = {r.id: r for r in prompts}
    diverged = [e for e in events if e.diverged]
    missing = sorted({e.prompt_id for e in diverged} - set(records))
    if missing:
        raise ValueError(
            f"{len(missing)} events have no prompt record (e.g. {missing[0]!r}); pass the job's prompts"
        )
    allowed = real_token_mask(pair.it, pair.it_tokenizer)
    eos = set(eos_ids(pair.it, pair.it_tokenizer))
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    done = 0
    for start in range(0, len(diverged), batch_size):
        batch = diverged[start : start + batch_size]
        alts = alternatives(pair, batch)
        jobs = [(e, b, *alt[b]) for e, alt in zip(batch, alts, strict=True) for b in branches]
        rows: list[dict] = []
        by_budget: dict[int, list[tuple]] = {}
        for job in jobs:
            by_budget.setdefault(budget_for(job[0].category, budgets), []).append(job)
        for budget, group in sorted(by_budget.items()):
            conts = greedy_rollouts(
                pair.it, allowed, eos, [[*e.input_ids, t] for e, _, t, _ in group], budget, pad
            )
            for (e, branch, token, rank), cont in zip(group, conts, strict=True):
                rows.append(_row(pair, records[e.prompt_id], e, branch, token, rank, cont, budget))
        order = {b: i for i, b in enumerate(branches)}
        rows.sort(key=lambda r: (r["prompt_id"], order[r["branch"]]))
        yield pa.Table.from_pylist(rows, schema=FORCED_SCHEMA)
        done += len(batch)
        if on_batch:
            on_batch(done, len(diverged))


def _row(
    pair: ModelPair,
    record: PromptRecord,
    e: DivergenceEvent,
    branch: str,
    token: int,
    rank: int,
    cont: list[int],
    budget: int,
) -> dict:
    """One branch's row: the continuation, its text and its scores."""
    tok = pair.it_tokenizer
    suffix = tok.decode(cont)
    validator, success = score(record, suffix)
    _, with_token = score(record, tok.decode([token, *cont]))
    return {
        "family": pair.family,
        "pair_id": pair.pair_id,
        "prompt_id": e.prompt_id,
        "category": e.category,
        "position": e.position,
        "branch": branch,
        "forced_token": token,
        "forced_text": tok.decode([token]),
        "it_rank": rank,
        "validator": validator,
        "success": success,
        "success_with_token": with_token,
        "n_new_tokens": len(cont),
        "stop": "eos" if len(cont) < budget else "budget",
        "continuation_ids": cont,
        "continuation_text": suffix,
    }


forced_table = whole(
    "forced_table",
    iter_forced,
    functools.partial(gathered, schema=FORCED_SCHEMA),
    "The whole forced-token table, sorted by prompt id and branch.",
)


def summarize_forced(table: pa.Table, n_resamples: int = 1000, seed: int = 23) -> pa.Table:
    """Per category: the it - pt success contrast and each branch's success rate, per pair and
    family-balanced, suffix-only and with the token (see `FORCED_SUMMARY_SCHEMA`)."""
    rows = table.to_pylist()
    cells: dict[tuple[str, str, str, str], dict[str, bool | None]] = {}
    for r in rows:  # (family, pair, category, prompt) -> branch -> success
        key = (r["family"], r["pair_id"], r["category"], r["prompt_id"])
        cells.setdefault(key, {})[r["branch"]] = (r["success"], r["success_with_token"])
    branches = [b for b in BRANCHES if any(b in v for v in cells.values())]
    out: list[dict] = []
    for view_i, view in enumerate(("suffix", "with_token")):
        stats = [("contrast", lambda v, i=view_i: _diff(v, i))] + [
            (f"success_{b}", lambda v, b=b, i=view_i: _one(v, b, i)) for b in branches
        ]
        for name, fn in stats:
            # (family, pair, category) -> per-event values
            groups: dict[tuple[str, str, str], list[float]] = {}
            for (fam, pid, cat, _), v in sorted(cells.items()):
                x = fn(v)
                if x is not None:
                    groups.setdefault((fam, pid, cat), []).append(x)
            out += _pair_rows(groups, name, view, n_resamples, seed)
            out += _balanced_rows(groups, name, view, n_resamples, seed)
    return pa.Table.from_pylist(out, schema=FORCED_SUMMARY_SCHEMA)


def _diff(v: dict, i: int) -> float | None:
    a, b = v.get("it", (None, None))[i], v.get("pt", (None, None))[i]
    return None if a is None or b is None else float(a) - float(b)


def _one(v: dict, branch: str, i: int) -> float | None:
    x = v.get(branch, (None, None))[i]
    return None if x is None else float(x)


def _pair_rows(groups: dict, name: str, view: str, n_resamples: int, seed: int) -> list[dict]:
    rows = []
    for (_, pid, cat), values in groups.items():
        x = np.asarray(values)
        draws = x[np.random.default_rng(seed).integers(0, len(x), (n_resamples, len(x)))].mean(axis=1)
        lo, hi = np.quantile(draws, [0.025, 0.975])
        rows.append(_summary("pair", pid, cat, name, view, float(x.mean()), lo, hi, len(x), 1))
    return rows


def _balanced_rows(groups: dict, name: str, view: str, n_resamples: int, seed: int) -> list[dict]:
    """Family-balanced: families weigh equally (pairs within a family too); draws resample events within pairs."""
    rows = []
    for cat in sorted({k[2] for k in groups}):
        fams: dict[str, list[np.ndarray]] = {}
        for (fam, _, c), values in groups.items():
            if c == cat:
                fams.setdefault(fam, []).append(np.asarray(values))
        rng = np.random.default_rng(seed)
        point = np.mean([np.mean([p.mean() for p in pairs]) for pairs in fams.values()])
        draws = np.zeros(n_resamples)
        for pairs in fams.values():
            fam_draw = np.zeros(n_resamples)
            for p in pairs:
                fam_draw += p[rng.integers(0, len(p), (n_resamples, len(p)))].mean(axis=1) / len(pairs)
            draws += fam_draw / len(fams)
        lo, hi = np.quantile(draws, [0.025, 0.975])
        n = sum(len(p) for pairs in fams.values() for p in pairs)
        rows.append(_summary("balanced", None, cat, name, view, float(point), lo, hi, n, len(fams)))
    return rows


def _summary(
    level: str,
    pid: str | None,
    cat: str,
    name: str,
    view: str,
    mean: float,
    lo: float,
    hi: float,
    n: int,
    f: int,
) -> dict:
    return {
        "level": level,
        "pair_id": pid,
        "category": cat,
        "statistic": name,
        "view": view,
        "mean": mean,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n_events": n,
        "n_families": f,
    }
