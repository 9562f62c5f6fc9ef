"""Pre-late commitment control (method section 4.5): is the interaction only where IT had already decided?

The IT boundary margin of an event is the logit lens on IT's own upstream state: IT's final norm and
unembedding applied to the residual entering the boundary block at the scored position,
    m_b = logit_lens(U_IT)[t_IT] - logit_lens(U_IT)[t_PT].
m_b > 0 means IT's boundary readout already favours t_IT before its late stack runs. The control restricts
the interaction to events with m_b <= 0 ("not yet committed"), bins it by m_b, and fits
interaction = a + c * m_b (a = the interaction where the boundary readout is neutral), each with a
percentile prompt-bootstrap CI. The method's claim: the interaction stays positive in all three views.

Computing m_b runs IT's blocks 0..b-1 only; the interaction comes from an existing cells table (joined on
prompt id), so no 2x2 is recomputed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from crosspatch.engine.adapters import positions_from_mask
from crosspatch.engine.control_schemas import BOUNDARY_MARGIN_SCHEMA, COMMITMENT_SCHEMA
from crosspatch.engine.crosspatch import event_batches, margin
from crosspatch.engine.divergence import DivergenceEvent
from crosspatch.engine.pairs import ModelPair
from crosspatch.engine.recipe import single_boundary
from crosspatch.engine.results import event_key_columns
from crosspatch.engine.stats import bootstrap_ci, bootstrap_means


@dataclass(frozen=True)
class View:
    """The interaction over one set of events (or the fit's intercept), with its CI."""

    estimate: float
    ci_low: float
    ci_high: float
    n: int
    margin_low: float | None = None
    margin_high: float | None = None


@dataclass(frozen=True)
class CommitmentSummary:
    """The three views of the method: uncommitted subset, margin bins, margin-adjusted intercept."""

    all: View
    uncommitted: View | None  # None when every event is committed
    committed: View | None
    bins: tuple[View, ...]
    intercept: View  # interaction at boundary margin 0 from interaction = a + c * margin
    slope: float  # c


@torch.no_grad()
def boundary_margins(
    pair: ModelPair, events: Sequence[DivergenceEvent], boundary: int | None = None, batch_size: int = 16
) -> pa.Table:
    """IT's boundary logit-lens margin for each diverged event (runs IT's blocks before the boundary only)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    b = single_boundary(pair, boundary)
    adapter = pair.it_adapter
    parts = []
    for batch, ids, mask, tokens in event_batches(pair, events, batch_size):
        position_ids = positions_from_mask(mask)  # [batch, seq]
        resid = adapter.embed(ids, position_ids)  # [batch, seq, d_model]
        ctx = adapter.context(resid, mask, position_ids)
        upstream, _ = adapter.run_layers(resid, ctx, 0, b)  # [batch, seq, d_model]
        m = margin(adapter, upstream[:, -1], tokens).double().cpu().numpy()  # [batch]
        parts.append(
            pa.table(
                {
                    **event_key_columns(pair.family, pair.pair_id, batch),
                    "boundary": [b] * len(batch),
                    "boundary_margin": m,
                    "favours_it": m > 0,
                },
                schema=BOUNDARY_MARGIN_SCHEMA,
            )
        )
    table = pa.concat_tables(parts) if parts else BOUNDARY_MARGIN_SCHEMA.empty_table()
    return table.sort_by("prompt_id")


def _joined(cells: pa.Table, margins: pa.Table) -> tuple[np.ndarray, np.ndarray, dict]:
    """(interaction `[n]`, margin `[n]`, group keys) for one pair x boundary x readout, joined on prompt id."""
    keys = {}
    for key in ("pair_id", "boundary", "readout"):
        values = set(cells.column(key).to_pylist())
        if len(values) != 1:
            raise ValueError(f"cells table must hold exactly one {key} (found {sorted(map(str, values))})")
        keys[key] = values.pop()
    keys["family"] = cells.column("family")[0].as_py() if cells.num_rows else ""
    boundaries = set(margins.column("boundary").to_pylist())
    if boundaries and boundaries != {keys["boundary"]}:
        raise ValueError(f"margins are at boundary {sorted(boundaries)}, cells at {keys['boundary']}")
    by_prompt = dict(
        zip(
            margins.column("prompt_id").to_pylist(),
            margins.column("boundary_margin").to_pylist(),
            strict=True,
        )
    )
    prompts = cells.column("prompt_id").to_pylist()
    missing = [p for p in prompts if p not in by_prompt]
    if missing:
        raise ValueError(f"{len(missing)} cells rows have no boundary margin (e.g. prompt {missing[0]!r})")
    interaction = np.asarray(cells.column("interaction").to_numpy(), dtype=np.float64)
    m = np.array([by_prompt[p] for p in prompts], dtype=np.float64)
    return interaction, m, keys


def _view(
    x: np.ndarray, n_resamples: int, seed: int, lo: float | None = None, hi: float | None = None
) -> View:
    mean, ci_lo, ci_hi = bootstrap_ci(x, n_resamples, seed)
    return View(mean, ci_lo, ci_hi, len(x), lo, hi)


def _intercept(interaction: np.ndarray, m: np.ndarray, n_resamples: int, seed: int) -> tuple[View, float]:
    """OLS interaction = a + c * margin; a's CI from bootstrapped sufficient statistics (shared resamples)."""
    stats = np.column_stack([m, interaction, m * m, m * interaction])  # [n, 4]

    def fit(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mx, my, mxx, mxy = s[..., 0], s[..., 1], s[..., 2], s[..., 3]
        var = mxx - mx * mx
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(var > 1e-12, (mxy - mx * my) / var, 0.0)
        return my - c * mx, c

    a, c = fit(stats.mean(axis=0))
    a_boot, _ = fit(bootstrap_means(stats, n_resamples, seed))  # [R]
    lo, hi = np.quantile(a_boot, [0.025, 0.975])
    return View(float(a), float(lo), float(hi), len(m)), float(c)


def commitment_summary(
    cells: pa.Table,
    margins: pa.Table,
    bin_edges: Sequence[float] | None = None,
    n_bins: int = 4,
    n_resamples: int = 2000,
    seed: int = 23,
) -> tuple[CommitmentSummary, pa.Table]:
    """The three views for one pair x boundary x readout of `cells`; bins at `bin_edges` or `n_bins` quantiles."""
    interaction, m, keys = _joined(cells, margins)
    if len(m) == 0:
        raise ValueError("no events to summarize")
    if bin_edges is None:
        if n_bins < 1:
            raise ValueError("n_bins must be >= 1")
        edges = np.unique(np.quantile(m, np.linspace(0, 1, n_bins + 1)))
    else:
        edges = np.asarray(sorted(bin_edges), dtype=np.float64)
        if len(edges) < 2:
            raise ValueError("bin_edges needs at least two values")
    bins = []
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        keep = (m >= lo) & ((m <= hi) if i == len(edges) - 2 else (m < hi))
        if keep.any():
            bins.append(_view(interaction[keep], n_resamples, seed, float(lo), float(hi)))
    unc, com = m <= 0, m > 0
    intercept, slope = _intercept(interaction, m, n_resamples, seed)
    summary = CommitmentSummary(
        all=_view(interaction, n_resamples, seed),
        uncommitted=_view(interaction[unc], n_resamples, seed, None, 0.0) if unc.any() else None,
        committed=_view(interaction[com], n_resamples, seed, 0.0, None) if com.any() else None,
        bins=tuple(bins),
        intercept=intercept,
        slope=slope,
    )
    views = [("all", summary.all), ("uncommitted", summary.uncommitted), ("committed", summary.committed)]
    views += [("bin", v) for v in summary.bins] + [("intercept", summary.intercept)]
    rows = [
        {
            **keys,
            "view": name,
            "margin_low": v.margin_low,
            "margin_high": v.margin_high,
            "estimate": v.estimate,
            "ci_low": v.ci_low,
            "ci_high": v.ci_high,
            "n": v.n,
        }
        for name, v in views
        if v is not None
    ]
    return summary, pa.Table.from_pylist(rows, schema=COMMITMENT_SCHEMA)
