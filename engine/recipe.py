"""Secondary scales of the 2x2 and recipe comparisons (method sections 2.2, 4.1 and 4.7).

- Portable share = mean PT-upstream late effect / mean IT-upstream late effect (the "direct component").
- Interaction share = mean interaction / mean native diagonal shift, Y(U_IT, L_IT) - Y(U_PT, L_PT).
Both are ratios of means; their CIs are percentile bootstraps of the ratio over shared prompt resamples
(numerator and denominator resampled together), the resamples `engine.stats.bootstrap_means` draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from crosspatch.engine.stats import bootstrap_means


@dataclass(frozen=True)
class Ratio:
    """A ratio of two means with its bootstrap CI (`nan` where the denominator's mean is 0)."""

    estimate: float
    ci_low: float
    ci_high: float
    numerator: float
    denominator: float
    n: int


def ratio_of_means(
    numerator: Sequence[float] | np.ndarray,
    denominator: Sequence[float] | np.ndarray,
    n_resamples: int = 2000,
    seed: int = 23,
    level: float = 0.95,
) -> Ratio:
    """mean(numerator) / mean(denominator) over paired units, CI from shared resamples of the pairs."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(
            f"numerator and denominator must be paired 1-d samples, got {num.shape} and {den.shape}"
        )
    means = bootstrap_means(np.column_stack([num, den]), n_resamples, seed)  # [R, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = means[:, 0] / means[:, 1]  # [R]
    n_mean, d_mean = float(num.mean()), float(den.mean())
    estimate = n_mean / d_mean if d_mean != 0 else float("nan")
    finite = ratios[np.isfinite(ratios)]
    if d_mean == 0 or len(finite) < len(ratios):
        return Ratio(estimate, float("nan"), float("nan"), n_mean, d_mean, len(num))
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(finite, [alpha, 1 - alpha])
    return Ratio(estimate, float(lo), float(hi), n_mean, d_mean, len(num))


def _column(cells: pa.Table, name: str) -> np.ndarray:
    return np.asarray(cells.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


def _one_group(cells: pa.Table) -> None:
    """The scales are per family x boundary x readout: refuse a table that mixes them."""
    for key in ("pair_id", "boundary", "readout"):
        if key in cells.column_names and len(set(cells.column(key).to_pylist())) > 1:
            raise ValueError(f"cells table mixes several {key} values; filter it to one {key} first")


def portable_share(cells: pa.Table, n_resamples: int = 2000, seed: int = 23) -> Ratio:
    """Mean PT-up late effect / mean IT-up late effect of one cells table (one pair, boundary, readout)."""
    _one_group(cells)
    return ratio_of_means(
        _column(cells, "pt_late_effect"), _column(cells, "it_late_effect"), n_resamples, seed
    )


def interaction_share(cells: pa.Table, n_resamples: int = 2000, seed: int = 23) -> Ratio:
    """Mean interaction / mean native diagonal shift Y(U_IT, L_IT) - Y(U_PT, L_PT) of one cells table."""
    _one_group(cells)
    diagonal = _column(cells, "y_itup_itlate") - _column(cells, "y_ptup_ptlate")
    return ratio_of_means(_column(cells, "interaction"), diagonal, n_resamples, seed)
