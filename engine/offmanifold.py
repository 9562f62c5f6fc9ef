"""Off-manifold checks of the 2x2 (method section 4.4): is the interaction an artefact of hybrid states?

Interpolation. The upstream state U(a) = (1 - a) U_PT + a U_IT (the residual entering the boundary block,
every position) runs through both late stacks for each a of the grid (default 0, .25, .5, .75, 1):
    late effect   L(a) = Y(U(a), L_IT) - Y(U(a), L_PT)
    contrast      C(a) = L(a) - L(0)          so C(0) = 0 and C(1) = the event's interaction
    slope         the event's least-squares slope of C(a) on a over the grid (= slope of L(a))
The summary is the mean slope over events with a percentile prompt-bootstrap CI. A smooth, positive curve
whose endpoint is the interaction says the effect grows along the straight PT -> IT path, not only at the
hybrid endpoint.

Signed permutation. U_rand = U_PT + P_s(U_IT - U_PT), where P_s permutes the d_model coordinates and flips
their signs at random (one draw per seed, shared by every event and position): the delta keeps its norm
and loses its coordinates. The random interaction
    R = [Y(U_rand, L_IT) - Y(U_rand, L_PT)] - [Y(U_PT, L_IT) - Y(U_PT, L_PT)]
is averaged over seeds per event; the summary is mean R / mean observed interaction (ratio of means, CI
over shared prompt resamples). The method reports 0.31x: a delta of the same size in random directions
recovers a small part of the effect.

Forward work per batch: the 2x2's two clean passes, then two late-stack passes per interior a and per
seed; the a = 0 and a = 1 endpoints are the 2x2's own cells.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from crosspatch.engine.anatomy import control_boundary
from crosspatch.engine.control_schemas import (
    INTERPOLATION_SCHEMA,
    OFFMANIFOLD_SUMMARY_SCHEMA,
    SIGNPERM_SCHEMA,
)
from crosspatch.engine.crosspatch import (
    CleanPasses,
    clean_passes,
    event_batches,
    late_stack_final,
    readout_margin,
)
from crosspatch.engine.divergence import DivergenceEvent
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.recipe import Ratio, ratio_of_means
from crosspatch.engine.results import event_key_columns
from crosspatch.engine.stats import bootstrap_ci
from crosspatch.engine.streams import gathered, reported, whole

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class OffManifoldSummary:
    """The off-manifold checks of one pair x boundary x readout, as the method reports them."""

    n_events: int
    alphas: tuple[float, ...]
    curve: tuple[float, ...]  # mean contrast C(a) per alpha
    slope: float
    slope_ci_low: float
    slope_ci_high: float
    interaction: float  # mean C(1) = the 2x2 interaction (nan when 1 is not on the grid)
    seeds: tuple[int, ...]
    random_interaction: float  # mean over events and seeds
    ratio: Ratio  # random / observed interaction (nan when the observed mean is 0)


def _check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    values = tuple(sorted({float(a) for a in alphas}))
    if len(values) < 2 or any(not (0.0 <= a <= 1.0) for a in values):
        raise ValueError(f"alphas must hold at least two distinct values in [0, 1], got {list(alphas)}")
    return values


def signed_permutation(d_model: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(permutation `[d_model]` long, signs `[d_model]` of +-1) for `seed`, the same on every machine."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(d_model, generator=gen)
    signs = torch.randint(0, 2, (d_model,), generator=gen) * 2 - 1
    return perm, signs


def _late(
    pair: ModelPair, late: str, passes: CleanPasses, upstream: torch.Tensor, boundary: int
) -> torch.Tensor:
    """`[batch, d_model]` final residual at the scored position of `late`'s stack run on `upstream`."""
    return pair.adapter(late).run_layers(upstream, passes.contexts[late], start=boundary)[0][:, -1]


@torch.no_grad()
def offmanifold_batch(
    pair: ModelPair,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: torch.Tensor,
    boundary: int,
    readout: str,
    alphas: Sequence[float],
    seeds: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One batch: `[alpha, 2, batch]` and `[seed, 2, batch]` Y (late IT, late PT); `[batch]` L(0), interaction."""
    passes = clean_passes(pair, input_ids, attention_mask, [boundary])  # 2 full forwards
    u_pt = passes.captured["pt"][boundary]  # [batch, seq, d_model]
    u_it = passes.captured["it"][boundary].to(u_pt.device)  # [batch, seq, d_model]
    ends = {
        (up, late): readout_margin(
            pair, readout, late, late_stack_final(pair, up, late, passes, boundary), tokens
        )
        for up in ("pt", "it")
        for late in ("it", "pt")
    }
    interp = np.empty((len(alphas), 2, len(tokens)))
    for i, a in enumerate(alphas):
        for k, late in enumerate(("it", "pt")):
            if a in (0.0, 1.0):
                interp[i, k] = ends[("it" if a == 1.0 else "pt", late)]
            else:
                u = torch.lerp(u_pt, u_it, a)  # [batch, seq, d_model]
                interp[i, k] = readout_margin(
                    pair, readout, late, _late(pair, late, passes, u, boundary), tokens
                )
    delta = u_it - u_pt  # [batch, seq, d_model]
    rand = np.empty((len(seeds), 2, len(tokens)))
    for i, seed in enumerate(seeds):
        perm, signs = signed_permutation(delta.shape[-1], seed)
        u = u_pt + delta[..., perm.to(delta.device)] * signs.to(
            delta.device, delta.dtype
        )  # [batch, seq, d_model]
        for k, late in enumerate(("it", "pt")):
            rand[i, k] = readout_margin(pair, readout, late, _late(pair, late, passes, u, boundary), tokens)
    pt_late = ends[("pt", "it")] - ends[("pt", "pt")]  # [batch] L(0)
    return interp, rand, pt_late, (ends[("it", "it")] - ends[("it", "pt")]) - pt_late


def iter_offmanifold(
    pair: ModelPair,
    events: Sequence[DivergenceEvent],
    boundary: int | None = None,
    readout: str = "it",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Stream (interpolation, signperm) tables batch by batch for the diverged `events`."""
    b = control_boundary(pair, boundary, readout, batch_size)
    if not seeds:
        raise ValueError("seeds must name at least one signed-permutation draw")
    grid = _check_alphas(alphas)
    n_scored = sum(e.diverged for e in events)
    for batch, ids, mask, tokens in reported(event_batches(pair, events, batch_size), n_scored, on_batch):
        interp, rand, late0, interaction = offmanifold_batch(pair, ids, mask, tokens, b, readout, grid, seeds)
        base = {
            **event_key_columns(pair.family, pair.pair_id, batch),
            "boundary": [b] * len(batch),
            "readout": [readout] * len(batch),
        }
        rows_i = []
        for i, a in enumerate(grid):
            late = interp[i, 0] - interp[i, 1]
            rows_i.append(
                pa.table(
                    {
                        **base,
                        "alpha": [a] * len(batch),
                        "y_itlate": interp[i, 0],
                        "y_ptlate": interp[i, 1],
                        "late_effect": late,
                        "contrast": late - late0,
                    },
                    schema=INTERPOLATION_SCHEMA,
                )
            )
        rows_s = [
            pa.table(
                {
                    **base,
                    "seed": [int(s)] * len(batch),
                    "y_itlate": rand[i, 0],
                    "y_ptlate": rand[i, 1],
                    "random_interaction": (rand[i, 0] - rand[i, 1]) - late0,
                    "observed_interaction": interaction,
                },
                schema=SIGNPERM_SCHEMA,
            )
            for i, s in enumerate(seeds)
        ]
        yield pa.concat_tables(rows_i), pa.concat_tables(rows_s)


def _gather(parts: list[tuple[pa.Table, pa.Table]]) -> tuple[pa.Table, pa.Table]:
    """The (interpolation, signperm) batches as two whole tables, sorted by prompt id and alpha / seed."""
    return (
        gathered([p[0] for p in parts], INTERPOLATION_SCHEMA, ("prompt_id", "alpha")),
        gathered([p[1] for p in parts], SIGNPERM_SCHEMA, ("prompt_id", "seed")),
    )


offmanifold = whole(
    "offmanifold",
    iter_offmanifold,
    _gather,
    "The whole (interpolation, signperm) tables for the diverged `events`, sorted by prompt id.",
)


def _pivot(table: pa.Table, key: str, value: str) -> tuple[list, np.ndarray]:
    """`[events, keys]` matrix of `value` (rows: prompt ids in sorted order; columns: sorted `key`s)."""
    d = table.select(["prompt_id", key, value]).to_pydict()
    keys = sorted(set(d[key]))
    prompts = sorted(set(d["prompt_id"]))
    row = {p: i for i, p in enumerate(prompts)}
    col = {k: j for j, k in enumerate(keys)}
    out = np.full((len(prompts), len(keys)), np.nan)
    for p, k, v in zip(d["prompt_id"], d[key], d[value], strict=True):
        out[row[p], col[k]] = v
    if np.isnan(out).any():
        raise ValueError(f"table is not complete: some events lack some {key} values")
    return keys, out


def summarize_offmanifold(
    interpolation: pa.Table, signperm: pa.Table, n_resamples: int = 2000, seed: int = 23
) -> OffManifoldSummary:
    """Slope of the interpolation contrast (mean, CI) and the signed-permutation random/observed ratio."""
    for table in (interpolation, signperm):
        for key in ("pair_id", "boundary", "readout"):
            if len(set(table.column(key).to_pylist())) > 1:
                raise ValueError(f"table mixes several {key} values; summarize one {key} at a time")
    if interpolation.num_rows == 0 or signperm.num_rows == 0:
        raise ValueError("no events to summarize")
    alphas, contrast = _pivot(interpolation, "alpha", "contrast")  # [events, alphas]
    a = np.asarray(alphas)
    centered = a - a.mean()
    slopes = (contrast - contrast.mean(axis=1, keepdims=True)) @ centered / (centered**2).sum()  # [events]
    slope, lo, hi = bootstrap_ci(slopes, n_resamples, seed)
    seeds, rand = _pivot(signperm, "seed", "random_interaction")  # [events, seeds]
    _, observed = _pivot(signperm, "seed", "observed_interaction")
    per_event_rand = rand.mean(axis=1)  # [events]
    return OffManifoldSummary(
        n_events=len(slopes),
        alphas=tuple(float(x) for x in a),
        curve=tuple(float(x) for x in contrast.mean(axis=0)),
        slope=slope,
        slope_ci_low=lo,
        slope_ci_high=hi,
        interaction=float(contrast[:, -1].mean()) if a[-1] == 1.0 else float("nan"),
        seeds=tuple(int(s) for s in seeds),
        random_interaction=float(per_event_rand.mean()),
        ratio=ratio_of_means(per_event_rand, observed[:, 0], n_resamples, seed),
    )


def offmanifold_table(summary: OffManifoldSummary, interpolation: pa.Table) -> pa.Table:
    """`summary` as OFFMANIFOLD_SUMMARY_SCHEMA rows (keys from the interpolation table it summarises)."""
    keys = {k: interpolation.column(k)[0].as_py() for k in ("family", "pair_id", "boundary", "readout")}
    nan = float("nan")

    def row(statistic: str, estimate: float, lo: float = nan, hi: float = nan, alpha: float | None = None):
        return {**keys, "statistic": statistic, "alpha": alpha, "estimate": estimate, "ci_low": lo,
                "ci_high": hi, "n": summary.n_events}  # fmt: skip

    rows = [row("slope", summary.slope, summary.slope_ci_low, summary.slope_ci_high)]
    rows += [row("curve", c, alpha=a) for a, c in zip(summary.alphas, summary.curve, strict=True)]
    rows += [row("interaction", summary.interaction), row("random_interaction", summary.random_interaction)]
    r = summary.ratio
    rows.append(row("signperm_ratio", r.estimate, r.ci_low, r.ci_high))
    return pa.Table.from_pylist(rows, schema=OFFMANIFOLD_SUMMARY_SCHEMA)
