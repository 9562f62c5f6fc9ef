"""Statistics of the 2x2 (method section 2.3): the one aggregation behind every summary table.

`summarize(cells)` is used by the CLI (`run`, `summarize`, `demo`), the library, the worker jobs and the
DuckDB `summaries` table. From a cells table of any number of pairs it builds three levels of rows:

- pair: per pair x boundary x readout x subset, the mean over prompts (one event per prompt at first
  divergence) with a percentile bootstrap 95% CI (2000 resamples, seed 23; all statistics and boundaries
  of a pair share the same resamples).
- family: the unweighted mean of the family's pairs; se_pair = (hi - lo) / (2 * 1.96) from each pair's
  CI, SE = sqrt(sum se_pair^2) / m over its m pairs, normal 95% CI (so a one-pair family's row has the
  symmetric CI estimate +- (hi - lo) / 2, which is what the balanced mean combines).
- balanced: the unweighted mean over families, the same normal approximation over the families' SEs
  (the paper's Core-5 synthesis); only when there are two or more families.

Headline rows (`headline` true) use each pair's headline boundary (cells column `headline_boundary`:
round(0.6 L) unless the job named a boundary), so families of different depth are combined at their own
late-stack start, never at "the first boundary". In a sweep there are also depth-matched family and
balanced rows (`headline` false): one per relative depth d = b / L that EVERY pair in the input swept,
matched exactly as a fraction (16/32 and 18/36 are both 0.5; 19/32 matches nothing at L = 36).

Secondary scales (method section 2.2), two more `statistic` values on every level:
- portable_share = mean PT-up late effect / mean IT-up late effect,
- interaction_share = mean interaction / mean native diagonal shift (Y[IT,IT] - Y[PT,PT]).
Both are ratios of means, never means of ratios. Pair rows: the ratio of the pair's means, CI = the
percentile interval of the ratio over the same prompt resamples as the pair's other statistics. Family
rows: the ratio of the family's unweighted pair means of numerator and denominator; balanced rows: the
ratio of the family-balanced means (the paper's 31.1% is of this kind). Their CIs combine the r-th
resample of every pair (pairs are resampled independently, so averaging the r-th resampled means over
pairs, then over families, is a stratified bootstrap of the combined means) and take the percentile
interval of the resampled ratio; the CI is null-valued (nan) when a resampled denominator is 0.

Pooled across-family null (balanced interaction rows, `p_value`): the statistic is the family-balanced
mean interaction; the null flips the sign of every interaction of one prompt id at once (in every pair
and family that scored it: the prompt is the unit), one-sided. With 2^P <= n_permutations sign patterns
over the P prompt ids it enumerates them all (exact p = #{null >= observed} / 2^P, `n_permutations` =
2^P), else it draws n_permutations random patterns (p = (1 + #) / (n + 1)).

Subsets: 'all', 'position>=k' (position_min), 'category=c' (by_category), and 'no_near_tie' whenever
the cells carry the events' `near_tie` flag (engine/divergence.py): only events known not to be near
ties (flag false; a null flag counts as unknown and is left out), so a result that rests on events where
bf16 rounding could swap the top two tokens shows up as a gap between 'all' and 'no_near_tie'.

Sign-flip null: swapping PT/IT labels within a prompt flips the sign of its interaction; the one-sided
p-value is (1 + #{null mean >= observed}) / (n_perm + 1), so it is never below 1 / (n_perm + 1). In a
sweep every boundary uses the SAME flips per prompt: `p_sweep` is the max-statistic test over boundaries
(max over boundaries of the mean interaction) and `p_adjusted` is Holm's step-down over the boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crosspatch.engine.results import CELL_COLUMNS, EFFECT_COLUMNS, SUMMARY_SCHEMA

STATISTICS = (*CELL_COLUMNS, *EFFECT_COLUMNS)
# secondary scales (method section 2.2): statistic -> (numerator column, denominator columns (a, b) = a - b)
RATIO_STATISTICS: dict[str, tuple[str, tuple[str, str | None]]] = {
    "portable_share": ("pt_late_effect", ("it_late_effect", None)),
    "interaction_share": ("interaction", ("y_itup_itlate", "y_ptup_ptlate")),
}
SUMMARY_STATISTICS = (*STATISTICS, *RATIO_STATISTICS)
NO_NEAR_TIE = "no_near_tie"  # the subset without near-tie events
Z95 = 1.959963984540054
REQUIRED_CELL_COLUMNS = (
    "family",
    "pair_id",
    "pair_label",
    "prompt_id",
    "category",
    "position",
    "boundary",
    "readout",
    "n_layers",
    "headline_boundary",
    *STATISTICS,
)


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


def sign_flip_test(
    values: np.ndarray, n_permutations: int = 20000, seed: int = 23
) -> tuple[np.ndarray, float]:
    """`[n, B]` per-prompt values at B boundaries -> (`[B]` one-sided p per boundary, max-statistic p).

    Each permutation flips each prompt's sign once, for all boundaries alike; the max-statistic p
    compares max_b mean_b against the null of max_b over the flipped means.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    n, n_b = values.shape
    if n == 0:
        raise ValueError("cannot test an empty sample")
    observed = values.mean(axis=0)  # [B]
    rng = np.random.default_rng(seed)
    exceed = np.zeros(n_b, dtype=np.int64)
    exceed_max = 0
    for start in range(0, n_permutations, 1000):
        r = min(1000, n_permutations - start)
        signs = rng.integers(0, 2, size=(r, n)) * 2 - 1  # [r, n] of +-1
        null = signs.astype(np.float64) @ values / n  # [r, B]
        exceed += (null >= observed - 1e-12).sum(axis=0)
        exceed_max += int((null.max(axis=1) >= observed.max() - 1e-12).sum())
    return (1 + exceed) / (n_permutations + 1), (1 + exceed_max) / (n_permutations + 1)


def sign_flip_pvalue(
    values: Sequence[float] | np.ndarray, n_permutations: int = 20000, seed: int = 23
) -> float:
    """One-sided p-value of mean(values) > 0 under random per-prompt sign flips (label swaps)."""
    p, _ = sign_flip_test(np.asarray(values, dtype=np.float64)[:, None], n_permutations, seed)
    return float(p[0])


def pooled_sign_flip_test(
    families: Sequence[Sequence[tuple[Sequence[str], Sequence[float] | np.ndarray]]],
    n_permutations: int = 20000,
    seed: int = 23,
) -> tuple[float, int]:
    """(one-sided p, patterns used) of the family-balanced mean under per-prompt sign flips.

    `families` -> pairs -> (prompt ids, interactions): statistic = mean over families of the mean over
    the family's pairs of the mean over its prompts. One sign per prompt id, shared by every pair.
    """
    if not families or any(not pairs for pairs in families):
        raise ValueError("the pooled null needs at least one pair in every family")
    contrib: dict[str, float] = {}  # prompt id -> its weighted share of the balanced mean
    for pairs in families:
        for ids, values in pairs:
            x = np.asarray(values, dtype=np.float64)
            if len(ids) != len(x) or len(x) == 0:
                raise ValueError("each pair needs one interaction per prompt id, and at least one")
            w = 1.0 / (len(families) * len(pairs) * len(x))
            for pid, v in zip(ids, x, strict=True):
                contrib[pid] = contrib.get(pid, 0.0) + w * v
    v = np.array([contrib[k] for k in sorted(contrib)])  # [P]
    observed = float(v.sum())
    n_prompts = len(v)
    if n_prompts <= 30 and 2**n_prompts <= n_permutations:
        codes = np.arange(2**n_prompts)[:, None] >> np.arange(n_prompts)[None, :] & 1  # [2^P, P]
        null = (1 - 2 * codes) @ v  # [2^P]
        return float((null >= observed - 1e-12).sum() / len(null)), len(null)
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, n_permutations, 1000):
        signs = rng.integers(0, 2, size=(min(1000, n_permutations - start), n_prompts)) * 2 - 1  # [r, P]
        exceed += int((signs @ v >= observed - 1e-12).sum())
    return (1 + exceed) / (n_permutations + 1), n_permutations


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values: sorted ascending, max_{j<=i} min(1, (m - j + 1) p_(j))."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def format_p(p: float | None, n_permutations: int | None) -> str:
    """A permutation p for printing: the floor 1/(n+1) as '≤ 5e-05', others with 2 significant digits."""
    if p is None:
        return ""
    if n_permutations and p <= 1.0 / (n_permutations + 1) * (1 + 1e-9):
        return f"≤ {1.0 / (n_permutations + 1):.2g}"
    return f"{p:.2g}"


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
    if "near_tie" in table.column_names and table.column("near_tie").null_count < table.num_rows:
        near_tie = np.asarray(table.column("near_tie").to_pylist(), dtype=object)
        subsets.append((NO_NEAR_TIE, near_tie == False))  # noqa: E712 (null is unknown: left out)
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
    """Pair, family and family-balanced rows (see the module docstring) as a `SUMMARY_SCHEMA` table."""
    if cells.num_rows == 0:
        return SUMMARY_SCHEMA.empty_table()
    missing = [c for c in REQUIRED_CELL_COLUMNS if c not in cells.column_names]
    if missing:
        raise ValueError(
            f"cells table lacks columns {missing} (written by an older crosspatch?); rerun `crosspatch run`"
        )
    pair_rows: list[dict] = []
    for pair_id in sorted(set(cells.column("pair_id").to_pylist())):
        pair_rows += _pair_rows(
            _where(cells, "pair_id", pair_id), n_resamples, seed, position_min, by_category, n_permutations
        )
    family_rows = _family_rows(pair_rows)
    rows = pair_rows + family_rows + _balanced_rows(family_rows, pair_rows, n_permutations, seed)
    return pa.Table.from_pylist(
        [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], schema=SUMMARY_SCHEMA
    )


def _where(table: pa.Table, column: str, value: object) -> pa.Table:
    """Rows of `table` whose `column` equals `value`."""
    return table.filter(pc.equal(table[column], value))


def _only(table: pa.Table, column: str, pair_id: str) -> object:
    """The single value of `column` in one pair's rows; two values mean two pairs share one id."""
    values = set(table.column(column).to_pylist())
    if len(values) != 1:
        raise ValueError(
            f"pair_id {pair_id!r} has several {column} values {sorted(map(str, values))}: two different "
            "pairs share one id (give each pair its own id)"
        )
    return values.pop()


def _pair_rows(
    cells: pa.Table,
    n_resamples: int,
    seed: int,
    position_min: Sequence[int],
    by_category: bool,
    n_permutations: int,
) -> list[dict]:
    """One pair's rows: per boundary x readout x subset x statistic, bootstrap CI; p-values on interaction."""
    pair_id = cells.column("pair_id")[0].as_py()
    meta = {c: _only(cells, c, pair_id) for c in ("family", "pair_label", "n_layers", "headline_boundary")}
    n_layers, headline = int(meta["n_layers"]), int(meta["headline_boundary"])
    boundaries = sorted(set(cells.column("boundary").to_pylist()))
    if headline not in boundaries:
        raise ValueError(f"pair {pair_id!r}: its headline boundary {headline} has no cells")
    rows: list[dict] = []
    for readout in sorted(set(cells.column("readout").to_pylist())):
        by_b = [_where(_where(cells, "readout", readout), "boundary", b) for b in boundaries]
        prompts = by_b[0].column("prompt_id").to_pylist()
        if len(set(prompts)) != len(prompts):
            raise ValueError(f"pair {pair_id!r}: a prompt appears twice at one boundary (cells given twice?)")
        aligned = []  # per boundary: the table sorted by prompt id
        for b, t in zip(boundaries, by_b, strict=True):
            if sorted(t.column("prompt_id").to_pylist()) != sorted(prompts):
                raise ValueError(f"pair {pair_id!r}: boundary {b} does not score the same prompts")
            aligned.append(t.take(np.argsort(np.asarray(t.column("prompt_id").to_pylist(), dtype=object))))
        data = np.stack(
            [np.column_stack([t.column(s).to_numpy() for s in STATISTICS]) for t in aligned]
        )  # [B, n, stats]
        for subset, keep in _subsets(aligned[0], position_min, by_category):
            x = data[:, keep]  # [B, n_subset, stats]
            n = x.shape[1]
            if n == 0:
                continue
            inter = x[:, :, STATISTICS.index("interaction")].T  # [n_subset, B]
            p, p_max = sign_flip_test(inter, n_permutations, seed)
            p_adj = holm(p)
            ids = np.asarray(aligned[0].column("prompt_id").to_pylist(), dtype=object)[keep]
            for bi, b in enumerate(boundaries):
                means = bootstrap_means(x[bi], n_resamples, seed)  # [R, stats]
                lo, hi = np.quantile(means, [0.025, 0.975], axis=0)
                common = dict(
                    level="pair",
                    family=meta["family"],
                    pair_id=pair_id,
                    pair_label=meta["pair_label"],
                    boundary=b,
                    n_layers=n_layers,
                    depth=b / n_layers,
                    headline=b == headline,
                    readout=readout,
                    subset=subset,
                    n=n,
                    n_pairs=1,
                )
                for j, stat in enumerate(STATISTICS):
                    is_inter = stat == "interaction"
                    rows.append(
                        dict(
                            **common,
                            statistic=stat,
                            estimate=float(x[bi, :, j].mean()),
                            ci_low=float(lo[j]),
                            ci_high=float(hi[j]),
                            p_value=float(p[bi]) if is_inter else None,
                            p_adjusted=float(p_adj[bi]) if is_inter else None,
                            p_sweep=float(p_max) if is_inter and len(boundaries) > 1 else None,
                            n_permutations=n_permutations if is_inter else None,
                        )
                    )
                    if is_inter:  # kept (not stored) for the pooled across-family null
                        rows[-1]["_prompts"] = ids.tolist()
                        rows[-1]["_values"] = x[bi, :, j]
                point = x[bi].mean(axis=0)  # [stats]
                for stat in RATIO_STATISTICS:
                    rows.append(
                        _ratio_row(
                            dict(**common, statistic=stat),
                            _ratio_parts(stat, point, numerator=True),
                            _ratio_parts(stat, point, numerator=False),
                            _ratio_parts(stat, means, numerator=True),  # [R]
                            _ratio_parts(stat, means, numerator=False),  # [R]
                        )
                    )
    return rows


def _ratio_parts(stat: str, means: np.ndarray, numerator: bool) -> np.ndarray:
    """Numerator or denominator mean of a ratio statistic from `[..., stats]` means (STATISTICS order)."""
    num, (a, b) = RATIO_STATISTICS[stat]
    if numerator:
        return means[..., STATISTICS.index(num)]
    out = means[..., STATISTICS.index(a)]
    return out - means[..., STATISTICS.index(b)] if b is not None else out


def _ratio_row(fields: dict, num: float, den: float, num_boot: np.ndarray, den_boot: np.ndarray) -> dict:
    """A ratio-of-means row: estimate num / den, percentile CI of the resampled ratios (nan if undefined)."""
    num, den = float(num), float(den)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = num_boot / den_boot  # [R]
    if den != 0 and np.isfinite(ratios).all():
        lo, hi = (float(v) for v in np.quantile(ratios, [0.025, 0.975]))
    else:
        lo = hi = float("nan")
    return dict(
        fields,
        estimate=num / den if den != 0 else float("nan"),
        ci_low=lo,
        ci_high=hi,
        p_value=None,
        p_adjusted=None,
        p_sweep=None,
        n_permutations=None,
        _num=num,
        _den=den,
        _num_boot=num_boot,
        _den_boot=den_boot,
    )


def _combine_ratio(group: list[dict], **fields: object) -> dict:
    """Ratio of the unweighted means of `group`'s numerators and denominators; r-th resamples averaged."""
    return _ratio_row(
        dict(
            pair_id=None,
            pair_label=None,
            boundary=_common([r["boundary"] for r in group]),
            n_layers=_common([r["n_layers"] for r in group]),
            depth=_common([r["depth"] for r in group]),
            n=sum(r["n"] for r in group),
            n_pairs=sum(r["n_pairs"] for r in group),
            **fields,
        ),
        np.mean([r["_num"] for r in group]),
        np.mean([r["_den"] for r in group]),
        np.mean([r["_num_boot"] for r in group], axis=0),
        np.mean([r["_den_boot"] for r in group], axis=0),
    )


def _common(values: list) -> object:
    """The one value all rows share, else None."""
    return values[0] if len(set(values)) == 1 else None


def _combine_statistic(group: list[dict], stat: str, **fields: object) -> dict:
    """One pooled row of statistic `stat`: a ratio of means for RATIO_STATISTICS, else the mean."""
    combine = _combine_ratio if stat in RATIO_STATISTICS else _combine
    return combine(group, **fields, statistic=stat)


def _combine(group: list[dict], **fields: object) -> dict:
    """Unweighted mean of `group`'s estimates with the normal-approximation CI of their CIs."""
    center, lo, hi = family_balanced([(r["estimate"], r["ci_low"], r["ci_high"]) for r in group])
    return dict(
        pair_id=None,
        pair_label=None,
        boundary=_common([r["boundary"] for r in group]),
        n_layers=_common([r["n_layers"] for r in group]),
        depth=_common([r["depth"] for r in group]),
        estimate=center,
        ci_low=lo,
        ci_high=hi,
        n=sum(r["n"] for r in group),
        n_pairs=sum(r["n_pairs"] for r in group),
        p_value=None,
        p_adjusted=None,
        p_sweep=None,
        n_permutations=None,
        **fields,
    )


def _shared_depths(pair_rows: list[dict]) -> list[Fraction]:
    """Relative depths b/L (exact fractions) that every pair swept; empty unless some pair swept."""
    by_pair: dict[str, set[Fraction]] = {}
    for r in pair_rows:
        by_pair.setdefault(r["pair_id"], set()).add(Fraction(r["boundary"], r["n_layers"]))
    if all(len(d) < 2 for d in by_pair.values()):
        return []
    return sorted(set.intersection(*by_pair.values()))


def _family_rows(pair_rows: list[dict]) -> list[dict]:
    """Per family x readout x subset x statistic: at each pair's headline, and at each shared depth."""
    selections: list[tuple[bool, Fraction | None]] = [(True, None)]
    selections += [(False, d) for d in _shared_depths(pair_rows)]
    out = []
    for headline, depth in selections:
        groups: dict[tuple, list[dict]] = {}
        for r in pair_rows:
            hit = r["headline"] if headline else Fraction(r["boundary"], r["n_layers"]) == depth
            if hit:
                groups.setdefault((r["family"], r["readout"], r["subset"], r["statistic"]), []).append(r)
        for (family, readout, subset, stat), group in groups.items():
            row = _combine_statistic(
                group, stat, level="family", family=family, headline=headline, readout=readout, subset=subset
            )
            if depth is not None:
                row["depth"] = float(depth)
            if stat == "interaction":
                row["_pairs"] = [(r["_prompts"], r["_values"]) for r in group]
            out.append(row)
    return out


def _balanced_rows(
    family_rows: list[dict], pair_rows: list[dict], n_permutations: int = 20000, seed: int = 23
) -> list[dict]:
    """Unweighted mean over families, for keys every family has; only with two or more families."""
    families = {r["family"] for r in pair_rows}
    if len(families) < 2:
        return []
    groups: dict[tuple, list[dict]] = {}
    for r in family_rows:
        key = (
            r["headline"],
            r["depth"] if not r["headline"] else None,
            r["readout"],
            r["subset"],
            r["statistic"],
        )
        groups.setdefault(key, []).append(r)
    out = []
    for (headline, depth, readout, subset, stat), group in groups.items():
        if {r["family"] for r in group} != families:
            continue
        row = _combine_statistic(
            group, stat, level="balanced", family=None, headline=headline, readout=readout, subset=subset
        )
        if depth is not None:
            row["depth"] = depth
        if stat == "interaction":
            row["p_value"], row["n_permutations"] = pooled_sign_flip_test(
                [r["_pairs"] for r in group], n_permutations, seed
            )
        out.append(row)
    return out
