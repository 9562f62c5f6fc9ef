"""Statistics of the 2x2: family means with percentile bootstrap CIs, the family-balanced mean, and
the sign-flip (label-swap) permutation null, as in the method (section 2.3).

- Bootstrap unit: the prompt (one event per prompt at first divergence). 2000 resamples, seed 23,
  percentile 95% CI; all statistics of a family share the same resamples.
- Family-balanced mean: unweighted mean over families; CI by normal approximation from the per-family
  bootstrap CIs (se_f = (hi - lo) / (2 * 1.96), se = sqrt(sum se_f^2) / F), as the paper's synthesis.
- Sign-flip null: swapping PT/IT labels within a prompt flips the sign of its interaction; p-value
  (1 + #{null mean >= observed}) / (n_perm + 1), one-sided.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from crosspatch.engine.results import CELL_COLUMNS, EFFECT_COLUMNS, SUMMARY_SCHEMA

STATISTICS = (*CELL_COLUMNS, *EFFECT_COLUMNS)
Z95 = 1.959963984540054


def bootstrap_means(
    values: np.ndarray, n_resamples: int = 2000, seed: int = 23, chunk: int = 500
) -> np.ndarray:
    """`[n]` or `[n, k]` values -> `[n_resamples]` or `[n_resamples, k]` resampled means (vectorised)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample")
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))  # [r, n]
        out.append(values[idx].mean(axis=1))
    return np.concatenate(out, axis=0)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int = 2000, seed: int = 23, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean and its percentile bootstrap CI."""
    values = np.asarray(values, dtype=np.float64)
    means = bootstrap_means(values, n_resamples, seed)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return float(values.mean()), float(lo), float(hi)


def sign_flip_pvalue(
    values: Sequence[float] | np.ndarray, n_permutations: int = 20000, seed: int = 23
) -> float:
    """One-sided p-value of mean(values) > 0 under random per-prompt sign flips (label swaps)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        raise ValueError("cannot test an empty sample")
    observed = values.mean()
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, n_permutations, 1000):
        r = min(1000, n_permutations - start)
        signs = rng.integers(0, 2, size=(r, n)) * 2 - 1  # [r, n] of +-1
        exceed += int(((signs * values).mean(axis=1) >= observed - 1e-12).sum())
    return (1 + exceed) / (n_permutations + 1)


def family_balanced(
    per_family: Sequence[tuple[float, float, float]],
) -> tuple[float, float, float]:
    """Unweighted mean over families of (mean, lo, hi) with a normal-approximation CI."""
    if not per_family:
        raise ValueError("no families to combine")
    means = np.array([m for m, _, _ in per_family])
    se = np.array([(hi - lo) / (2 * Z95) for _, lo, hi in per_family])
    center = float(means.mean())
    half = Z95 * float(np.sqrt((se**2).sum())) / len(per_family)
    return center, center - half, center + half


def _subsets(table: pa.Table, position_min: Sequence[int], by_category: bool) -> list[tuple[str, np.ndarray]]:
    position = np.asarray(table.column("position").to_numpy(zero_copy_only=False))
    subsets = [("all", np.ones(len(position), dtype=bool))]
    subsets += [(f"position>={k}", position >= k) for k in position_min]
    if by_category:
        category = np.asarray(table.column("category").to_pylist(), dtype=object)
        subsets += [(f"category={c}", category == c) for c in sorted(set(category.tolist()))]
    return subsets


def summarize(
    cells: pa.Table,
    n_resamples: int = 2000,
    seed: int = 23,
    position_min: Sequence[int] = (),
    by_category: bool = False,
    n_permutations: int = 20000,
) -> pa.Table:
    """Per family x boundary x readout x subset: every cell and effect with bootstrap CI; the interaction
    also gets the sign-flip p-value. Adds a family-balanced row (`family='__mean__'`) when several
    families are present.
    """
    rows: list[dict] = []
    if cells.num_rows == 0:
        return SUMMARY_SCHEMA.empty_table()
    keys = cells.select(["family", "pair_id", "boundary", "readout"]).to_pylist()
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault((k["family"], k["pair_id"], k["boundary"], k["readout"]), []).append(i)
    data = np.column_stack([cells.column(s).to_numpy() for s in STATISTICS])  # [rows, stats]
    for (family, pair_id, boundary, readout), idx in groups.items():
        sub_table = cells.take(idx)
        sub_data = data[idx]
        for subset, keep in _subsets(sub_table, position_min, by_category):
            x = sub_data[keep]
            if len(x) == 0:
                continue
            means = bootstrap_means(x, n_resamples, seed)  # [R, stats]
            lo, hi = np.quantile(means, [0.025, 0.975], axis=0)
            p = sign_flip_pvalue(x[:, STATISTICS.index("interaction")], n_permutations, seed)
            for j, stat in enumerate(STATISTICS):
                rows.append(
                    dict(
                        family=family,
                        pair_id=pair_id,
                        boundary=boundary,
                        readout=readout,
                        subset=subset,
                        statistic=stat,
                        estimate=float(x[:, j].mean()),
                        ci_low=float(lo[j]),
                        ci_high=float(hi[j]),
                        n=len(x),
                        p_value=p if stat == "interaction" else None,
                    )
                )
    rows += _family_balanced_rows(rows)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def _family_balanced_rows(rows: list[dict]) -> list[dict]:
    """Family-balanced means over families that share boundary-independent keys (readout, subset, stat)."""
    by_key: dict[tuple, list[dict]] = {}
    for r in rows:
        by_key.setdefault((r["readout"], r["subset"], r["statistic"]), []).append(r)
    out = []
    for (readout, subset, stat), group in by_key.items():
        families = {r["family"] for r in group}
        if len(families) < 2:
            continue
        # one estimate per family: its first boundary (families differ in depth, so boundaries differ)
        per_family = {}
        for r in group:
            per_family.setdefault(r["family"], r)
        center, lo, hi = family_balanced(
            [(r["estimate"], r["ci_low"], r["ci_high"]) for r in per_family.values()]
        )
        out.append(
            dict(
                family="__mean__",
                pair_id="__mean__",
                boundary=-1,
                readout=readout,
                subset=subset,
                statistic=stat,
                estimate=center,
                ci_low=lo,
                ci_high=hi,
                n=sum(r["n"] for r in per_family.values()),
                p_value=None,
            )
        )
    return out
