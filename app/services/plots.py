"""PNG figures of a job's results, drawn from the results tables (Arrow), headless.

    family_2x2.png              per family: the four cells and the three effects, mean with 95% CI
    interaction_by_boundary.png per family: the interaction across boundaries (sweeps and lists)
    top_features.png            per family: the top features' attribution scores
    ablation_curve.png          per family: ablating (or rescuing) the top-k set and its controls over k
    forced_contrasts.png        per category: forced-token success contrast (IT token - PT token), per pair and
                                family-balanced, with 95% CI and event counts (method §6.1)
    continuation_by_n.png       C_N interaction and tail-only C_N over N, per variant (method §6.2)
    interpolation.png           per pair: the off-manifold contrast C(a) over the PT->IT interpolation grid
    baselines.png               per pair: interaction by selection condition (first divergence, random, ...)
    lineage.png                 per lineage job: interaction of each stage on the fixed support
    handoff_dose.png            per pair: rescue fraction over alpha, top set and controls (method §5.5)
    handoff_windows.png         per pair: MLP-window grafts, total vs mediated margin change (method §5.5)
    closure.png                 per pair x boundary: closure by PCA rank, a line per alpha, controls as markers
                                (gaussian, random, sign-flip, wrong descendant; method §5.6)

Each `plot_*` takes a results table (schemas in `engine.results`) and a path, draws with matplotlib's
object API on an Agg canvas (no display, no pyplot global state, so safe on the service's background
thread) and returns the path, or None when the table holds nothing that figure shows.
`write_figures` draws every figure that applies; `write_job_figures` does it for an ingested job and
never raises: a figure that fails is logged and skipped, and the job's status is not touched.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from crosspatch.app.store.layout import figures_dir
from crosspatch.engine.results import CELL_COLUMNS, EFFECT_COLUMNS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from crosspatch.app.store.duckdb import ResultsStore

log = logging.getLogger(__name__)

FIGURE_NAMES = (
    "family_2x2",
    "interaction_by_boundary",
    "top_features",
    "ablation_curve",
    "forced_contrasts",
    "continuation_by_n",
    "interpolation",
    "baselines",
    "lineage",
)
CELL_LABELS = {
    "y_ptup_ptlate": "PT up\nPT late",
    "y_ptup_itlate": "PT up\nIT late",
    "y_itup_ptlate": "IT up\nPT late",
    "y_itup_itlate": "IT up\nIT late",
}
EFFECT_LABELS = {
    "pt_late_effect": "IT-late effect\n(PT up)",
    "it_late_effect": "IT-late effect\n(IT up)",
    "interaction": "interaction",
}
MEAN_FAMILY = "__mean__"
MAX_ROWS = 200_000  # rows of one table read for figures


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _rows(table: pa.Table, **equal: Any) -> list[dict[str, Any]]:
    return [r for r in table.to_pylist() if all(r.get(k) == v for k, v in equal.items())]


def _errors(rows: Sequence[dict[str, Any]], value: str = "estimate") -> list[list[float]]:
    """Asymmetric error bars [[below...], [above...]] from ci_low/ci_high (0 where missing)."""
    below = [max(r[value] - r["ci_low"], 0.0) if r.get("ci_low") is not None else 0.0 for r in rows]
    above = [max(r["ci_high"] - r[value], 0.0) if r.get("ci_high") is not None else 0.0 for r in rows]
    return [below, above]


def _families(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Families in order, the cross-family mean last."""
    names = sorted({r["family"] for r in rows} - {MEAN_FAMILY})
    return names + ([MEAN_FAMILY] if any(r["family"] == MEAN_FAMILY for r in rows) else [])


def _family_view(rows: Sequence[dict[str, Any]], boundary: int | None) -> list[dict[str, Any]]:
    """Rows to draw one panel each: family rows at the headline boundaries plus the family-balanced row
    (as MEAN_FAMILY); with `boundary`, each pair's rows at that boundary instead (labelled by pair id)."""
    if boundary is not None:
        return [
            {**r, "family": r["pair_id"]} for r in rows if r["level"] == "pair" and r["boundary"] == boundary
        ]
    out = [r for r in rows if r["level"] == "family" and r["headline"]]
    return out + [{**r, "family": MEAN_FAMILY} for r in rows if r["level"] == "balanced" and r["headline"]]


def plot_family_2x2(
    summaries: pa.Table, path: Path, *, readout: str = "it", subset: str = "all", boundary: int | None = None
) -> Path | None:
    """Per family, bars of the four cells and the three effects (mean over events, 95% CI).

    Each family shows the mean of its pairs at their headline boundaries (or, with `boundary`, each pair
    at that boundary); the family-balanced mean comes last.
    """
    rows = _family_view(_rows(summaries, readout=readout, subset=subset), boundary)
    families = _families(rows)
    if not families:
        return None
    fig = _new_figure(10, 2.6 * len(families) + 0.6)
    axes = fig.subplots(len(families), 2, squeeze=False, width_ratios=[4, 3])
    for (ax_cells, ax_effects), family in zip(axes, families, strict=True):
        by_stat = {r["statistic"]: r for r in rows if r["family"] == family}
        n = max((r["n"] or 0 for r in by_stat.values()), default=0)
        b = next(iter(by_stat.values()))["boundary"]
        where = "headline boundary" if b is None else f"boundary {b}"
        label = "family-balanced mean" if family == MEAN_FAMILY else f"{family} ({where})"
        for ax, names, labels, color in (
            (ax_cells, CELL_COLUMNS, CELL_LABELS, ["#9aa5b1", "#5c7fa3", "#d9a05b", "#b5523b"]),
            (ax_effects, EFFECT_COLUMNS, EFFECT_LABELS, ["#5c7fa3", "#b5523b", "#2f2f2f"]),
        ):
            present = [s for s in names if s in by_stat]
            data = [by_stat[s] for s in present]
            xs = range(len(data))
            ax.bar(xs, [r["estimate"] for r in data], color=color[: len(data)], width=0.65)
            ax.errorbar(
                xs, [r["estimate"] for r in data], yerr=_errors(data), fmt="none", ecolor="k", capsize=4
            )
            ax.set_xticks(list(xs), [labels[s] for s in present], fontsize=8)
            ax.axhline(0, color="k", linewidth=0.6)
            ax.grid(axis="y", alpha=0.3)
        ax_cells.set_ylabel("logit(t_it) - logit(t_pt)", fontsize=8)
        ax_cells.set_title(f"{label}: cells (n={n})", fontsize=9, loc="left")
        inter = by_stat.get("interaction")
        p = f", p={inter['p_value']:.3g}" if inter and inter.get("p_value") is not None else ""
        ax_effects.set_title(f"effects{p}", fontsize=9, loc="left")
    fig.suptitle(
        f"2x2 cross-patch, readout {readout}, subset {subset}; bars: mean, whiskers: 95% CI", fontsize=10
    )
    return _save(fig, path)


def plot_interaction_by_boundary(
    summaries: pa.Table,
    path: Path,
    *,
    readout: str = "it",
    subset: str = "all",
    statistic: str = "interaction",
) -> Path | None:
    """Per pair, `statistic` (the interaction by default) over boundaries with its 95% CI band.

    One line per pair; drawn only when some pair has results at two or more boundaries.
    """
    rows = _rows(summaries, readout=readout, subset=subset, statistic=statistic, level="pair")
    rows = [{**r, "family": r["pair_id"]} for r in rows]  # one line per pair
    families = _families(rows)
    if not any(len({r["boundary"] for r in rows if r["family"] == f}) >= 2 for f in families):
        return None
    fig = _new_figure(7, 4.2)
    ax = fig.subplots()
    for family in families:
        mine = sorted((r for r in rows if r["family"] == family), key=lambda r: r["boundary"])
        xs = [r["boundary"] for r in mine]
        ys = [r["estimate"] for r in mine]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=family)
        lo = [r["ci_low"] if r["ci_low"] is not None else r["estimate"] for r in mine]
        hi = [r["ci_high"] if r["ci_high"] is not None else r["estimate"] for r in mine]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.axhline(0, color="k", linewidth=0.6)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("boundary (first late block)")
    ax.set_ylabel(statistic)
    ax.set_title(f"{statistic} by boundary, readout {readout}, subset {subset} (band: 95% CI)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_top_features(feature_effects: pa.Table, path: Path, *, n: int = 15) -> Path | None:
    """Per family, the `n` features with the highest attribution scores (with CIs where present)."""
    rows = [
        r
        for r in feature_effects.to_pylist()
        if r["intervention"] == "attribution" and r["latent"] is not None and r["effect"] is not None
    ]
    families = _families(rows)
    if not families:
        return None
    shown = min(n, max(sum(r["family"] == f for r in rows) for f in families))
    fig = _new_figure(7, (0.3 * shown + 0.9) * len(families))
    axes = fig.subplots(len(families), 1, squeeze=False)[:, 0]
    for ax, family in zip(axes, families, strict=True):
        top = sorted((r for r in rows if r["family"] == family), key=lambda r: -r["effect"])[:n][::-1]
        labels = [f"{r['dictionary_id']}:{r['latent']}" for r in top]
        ys = range(len(top))
        ax.barh(ys, [r["effect"] for r in top], color="#5c7fa3")
        if any(r["ci_low"] is not None for r in top):
            ax.errorbar(
                [r["effect"] for r in top], ys, xerr=_errors(top, "effect"), fmt="none", ecolor="k", capsize=2
            )
        ax.set_yticks(list(ys), labels, fontsize=7)
        ax.axvline(0, color="k", linewidth=0.6)
        ax.set_title(f"{family}: top {len(top)} features by attribution score", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_ablation_curve(feature_effects: pa.Table, path: Path, *, statistic: str = "share") -> Path | None:
    """Per family, `statistic` of each set-level intervention (top-k ablation and its controls) over k."""
    rows = [
        r
        for r in feature_effects.to_pylist()
        if r["latent"] is None
        and r["statistic"] == statistic
        and r["k"] is not None
        and r["effect"] is not None
        and r["intervention"].startswith(("ablate_", "rescue_"))
    ]
    families = _families(rows)
    if not families:
        return None
    fig, axes = _stacked(len(families), 7, 3.2)
    for ax, family in zip(axes, families, strict=True):
        mine = [r for r in rows if r["family"] == family]
        _ci_curves(ax, mine, "intervention", "k")
        _finish(
            ax, f"{family}: {statistic} over k (band: 95% CI)", "k (features in the set)", statistic, legend=7
        )
    return _save(fig, path)


def plot_forced_contrasts(forced_summaries: pa.Table, path: Path, *, view: str = "suffix") -> Path | None:
    """Per category: the IT-minus-PT forced-token success contrast with CI and n, per pair and balanced."""
    rows = [r for r in forced_summaries.to_pylist() if r["statistic"] == "contrast" and r["view"] == view]
    if not rows:
        return None
    rows.sort(key=lambda r: (r["category"], r["level"] != "balanced", r["pair_id"] or ""))
    fig = _new_figure(7, 0.35 * len(rows) + 1.2)
    ax = fig.subplots()
    ys = list(range(len(rows)))[::-1]
    values = [r["mean"] for r in rows]
    colors = ["#c0504d" if r["level"] == "balanced" else "#5c7fa3" for r in rows]
    ax.barh(ys, values, color=colors)
    ax.errorbar(values, ys, xerr=_errors(rows, "mean"), fmt="none", ecolor="k", capsize=2)
    labels = [f"{r['category']} / {r['pair_id'] or 'family-balanced'} (n={r['n_events']})" for r in rows]
    ax.set_yticks(ys, labels, fontsize=7)
    ax.axvline(0, color="k", linewidth=0.6)
    ax.set_xlabel(f"success(IT token) - success(PT token), {view}")
    ax.set_title("forced-token contrast by category (95% CI)", fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_continuation_by_n(continuation_summaries: pa.Table, path: Path) -> Path | None:
    """C_N interaction (solid) and tail-only C_N (dashed) over N, one line per pair x variant."""
    rows = continuation_summaries.to_pylist()
    if not rows:
        return None
    fig = _new_figure(7, 4)
    ax = fig.subplots()
    for pair_id, variant in sorted({(r["pair_id"], r["variant"]) for r in rows}):
        for stat, style in (("interaction", "-"), ("tail_interaction", "--")):
            curve = sorted(
                (r for r in rows if (r["pair_id"], r["variant"], r["statistic"]) == (pair_id, variant, stat)),
                key=lambda r: r["n"],
            )
            if not curve:
                continue
            xs = [r["n"] for r in curve]
            label = f"{pair_id} {variant}" + (" (tail-only)" if stat == "tail_interaction" else "")
            (line,) = ax.plot(xs, [r["mean"] for r in curve], style, marker="o", markersize=3, label=label)
            ax.fill_between(
                xs,
                [r["ci_low"] for r in curve],
                [r["ci_high"] for r in curve],
                color=line.get_color(),
                alpha=0.15,
            )
    _finish(
        ax,
        "constrained continuation: C_N by N (band: 95% CI)",
        "N (tail tokens)",
        "C_N interaction",
        legend=6,
    )
    return _save(fig, path)


def plot_interpolation(offmanifold: pa.Table, path: Path) -> Path | None:
    """Per pair, the mean contrast C(a) = L(a) - L(0) over the interpolation grid; slope and ratio in the title."""
    rows = offmanifold.to_pylist()
    pairs = sorted({r["pair_id"] for r in rows if r["statistic"] == "curve"})
    if not pairs:
        return None
    fig, axes = _stacked(len(pairs), 6, 3.0)
    for ax, pair_id in zip(axes, pairs, strict=True):
        mine = [r for r in rows if r["pair_id"] == pair_id]
        curve = sorted((r for r in mine if r["statistic"] == "curve"), key=lambda r: r["alpha"])
        by = {r["statistic"]: r for r in mine if r["statistic"] != "curve"}
        ax.plot([r["alpha"] for r in curve], [r["estimate"] for r in curve], marker="o", color="#5c7fa3")
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_xlabel("a  (upstream = (1 - a) U_PT + a U_IT)")
        ax.set_ylabel("contrast C(a) (logits)")
        s, q = by.get("slope"), by.get("signperm_ratio")
        title = f"{pair_id}: interpolation"
        if s is not None:
            title += f", slope {s['estimate']:+.2f} [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}]"
        if q is not None:
            title += f"; signed-perm ratio {q['estimate']:.2f}"
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_baselines(baselines: pa.Table, path: Path) -> Path | None:
    """Per pair, the interaction of each selection condition (bars, 95% CI)."""
    rows = [r for r in baselines.to_pylist() if r["interaction"] is not None]
    groups = _groups(rows, "pair_id")
    if not groups:
        return None
    fig, axes = _stacked(len(groups), 7, 2.8)
    for ax, (pair_id, mine) in zip(axes, groups.items(), strict=True):
        xs = range(len(mine))
        ax.bar(xs, [r["interaction"] for r in mine], color="#5c7fa3")
        ax.errorbar(
            xs, [r["interaction"] for r in mine], yerr=_errors(mine, "interaction"), fmt="none", ecolor="k"
        )
        ax.set_xticks(list(xs), [r["condition"].replace("_", "\n", 1) for r in mine], fontsize=7)
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_ylabel("interaction (logits)")
        ax.set_title(f"{pair_id}: selection baselines (95% CI)", fontsize=9, loc="left")
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_lineage(lineage: pa.Table, path: Path) -> Path | None:
    """The interaction of each lineage stage on the fixed support (in the job's stage order, 95% CI)."""
    rows = lineage.to_pylist()
    if not rows:
        return None
    fig = _new_figure(6, 3.2)
    ax = fig.subplots()
    xs = range(len(rows))
    ax.plot(xs, [r["interaction"] for r in rows], marker="o", color="#5c7fa3")
    ax.errorbar(
        xs, [r["interaction"] for r in rows], yerr=_errors(rows, "interaction"), fmt="none", ecolor="k"
    )
    ax.set_xticks(list(xs), [r["stage"] for r in rows])
    ax.axhline(0, color="k", linewidth=0.6)
    ax.set_ylabel("interaction (logits)")
    ax.set_title(f"lineage of {rows[0]['base_id']}: interaction per stage (95% CI)", fontsize=9, loc="left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_closure(closure: pa.Table, path: Path) -> Path | None:
    """Per pair x boundary, closure by PCA rank: one line per alpha (95% CI), the controls (alpha 1) as
    markers; ranks that cannot be fitted stay on the axis, marked not valid."""
    rows = closure.to_pylist()
    groups = _groups([{**r, "panel": (r["pair_id"], r["boundary"])} for r in rows], "panel")
    if not groups:
        return None
    fig, axes = _stacked(len(groups), 6.5, 3.0)
    controls = {"gaussian": ("s", "#999999"), "random": ("^", "#c49a3a"), "sign_flip": ("v", "#b05050"),
                "wrong_descendant": ("D", "#6a4c93")}  # fmt: skip

    def label(r: dict[str, Any]) -> str:
        return "full" if r["full_delta"] else str(r["rank"])

    for ax, ((pair_id, boundary), mine) in zip(axes, groups.items(), strict=True):
        labels = list(dict.fromkeys(label(r) for r in mine))
        x = {name: i for i, name in enumerate(labels)}
        pca = [r for r in mine if r["arm"] == "pca" and r["valid"]]
        for alpha in sorted({r["alpha"] for r in pca}):
            pts = [r for r in pca if r["alpha"] == alpha]
            xs, ys = [x[label(r)] for r in pts], [r["closure"] for r in pts]
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=f"PCA, alpha {alpha:g}")
            ax.errorbar(xs, ys, yerr=_errors(pts, "closure"), fmt="none", ecolor=line.get_color(), alpha=0.5)
        for arm, (marker, color) in controls.items():
            pts = [r for r in mine if r["arm"] == arm and r["valid"]]
            if pts:
                xs, ys = [x[label(r)] for r in pts], [r["closure"] for r in pts]
                ax.errorbar(
                    xs, ys, yerr=_errors(pts, "closure"), fmt=marker, color=color, label=arm, capsize=2
                )
        for name in labels:
            if not any(r["valid"] for r in mine if label(r) == name):
                ax.annotate("not valid", (x[name], 0), fontsize=6, ha="center", rotation=90)
        ax.set_xticks(range(len(labels)), labels)
        ax.axhline(1, color="k", linewidth=0.4, linestyle="--")
        _finish(
            ax,
            f"{pair_id}, boundary {boundary}: closure by rank (controls at alpha 1; 95% CI)",
            "PCA rank of the injected boundary shift",
            "closure",
            legend=6,
        )
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the panel, off the lines
    return _save(fig, path)


def _groups(rows: list[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    """`rows` grouped by `key`, groups in sorted key order (one panel each)."""
    return {v: [r for r in rows if r[key] == v] for v in sorted({r[key] for r in rows})}


def _stacked(n: int, width: float, height: float) -> tuple[Figure, Any]:
    """A figure of `n` panels one above the other, `height` inches each (+0.4 for the titles), and its axes."""
    fig = _new_figure(width, height * n + 0.4)
    return fig, fig.subplots(n, 1, squeeze=False)[:, 0]


def _finish(ax: Any, title: str, xlabel: str, ylabel: str, legend: int) -> None:
    """A line panel's furniture: zero line, axis labels, left title, grid, legend (font size `legend`)."""
    ax.axhline(0, color="k", linewidth=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend)


def _ci_curves(ax: Any, rows: list[dict[str, Any]], series: str, x: str) -> None:
    """One line per value of `series` (its label) of effect over `x`, with its 95% CI as a band."""
    for name in sorted({r[series] for r in rows}):
        curve = sorted((r for r in rows if r[series] == name), key=lambda r: r[x])
        xs = [r[x] for r in curve]
        (line,) = ax.plot(xs, [r["effect"] for r in curve], marker="o", markersize=3, label=name)
        lo = [r["ci_low"] if r["ci_low"] is not None else r["effect"] for r in curve]
        hi = [r["ci_high"] if r["ci_high"] is not None else r["effect"] for r in curve]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)


def _pair_rows(handoff: pa.Table, **equal: Any) -> list[dict[str, Any]]:
    return [r for r in _rows(handoff, level="pair", **equal) if r["effect"] is not None]


def plot_handoff_dose(handoff: pa.Table, path: Path) -> Path | None:
    """Per pair: rescue fraction over alpha for the top set and its controls (band: 95% CI)."""
    rows = _pair_rows(handoff, analysis="dose", statistic="rescue_fraction")
    groups = _groups(rows, "pair_id")
    if not groups:
        return None
    fig, axes = _stacked(len(groups), 6, 3.0)
    for ax, (pair_id, mine) in zip(axes, groups.items(), strict=True):
        _ci_curves(ax, mine, "set_kind", "alpha")
        ax.axhline(1, color="k", linewidth=0.6, linestyle=":")
        _finish(
            ax,
            f"{pair_id}: rescue dose-response (band: 95% CI)",
            "alpha (PT-up -> IT-up feature activations)",
            "rescue fraction",
            legend=7,
        )
    return _save(fig, path)


def plot_handoff_windows(handoff: pa.Table, path: Path) -> Path | None:
    """Per pair and direction: total vs mediated (top set) margin change for each graft window, 95% CI."""
    panels = [
        (pair_id, analysis)
        for pair_id in sorted({r["pair_id"] for r in _pair_rows(handoff)})
        for analysis in ("rescue_graft", "degrade_graft")
        if _pair_rows(handoff, pair_id=pair_id, analysis=analysis)
    ]
    if not panels:
        return None
    fig, axes = _stacked(len(panels), 7, 2.8)
    for ax, (pair_id, analysis) in zip(axes, panels, strict=True):
        total = {
            r["window_name"]: r
            for r in _pair_rows(handoff, pair_id=pair_id, analysis=analysis, statistic="total")
        }
        med = {
            r["window_name"]: r
            for r in _pair_rows(
                handoff, pair_id=pair_id, analysis=analysis, set_kind="topk", statistic="mediated"
            )
        }
        windows = [w for w in total if w in med]
        xs = list(range(len(windows)))
        for offset, (label, data) in zip(
            (-0.2, 0.2), (("total", total), ("mediated (top set)", med)), strict=True
        ):
            vals = [data[w]["effect"] for w in windows]
            err = [
                [
                    v - (data[w]["ci_low"] if data[w]["ci_low"] is not None else v)
                    for v, w in zip(vals, windows, strict=True)
                ],
                [
                    (data[w]["ci_high"] if data[w]["ci_high"] is not None else v) - v
                    for v, w in zip(vals, windows, strict=True)
                ],
            ]
            ax.bar([x + offset for x in xs], vals, width=0.4, yerr=err, capsize=2, label=label)
        ax.set_xticks(xs, windows, fontsize=7)
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_ylabel("margin change")
        ax.set_title(f"{pair_id}: {analysis.replace('_', ' ')} (error bars: 95% CI)", fontsize=9, loc="left")
        ax.legend(fontsize=7)
    return _save(fig, path)


def write_figures(tables: dict[str, pa.Table], out_dir: Path) -> list[Path]:
    """Every figure the tables support (`summaries`, `feature_effects`, controls), as `out_dir/<name>.png`.

    A figure that fails to draw is logged and skipped; the others are still written.
    """
    plan: list[tuple[str, str, Callable[[pa.Table, Path], Path | None]]] = [
        ("family_2x2", "summaries", plot_family_2x2),
        ("interaction_by_boundary", "summaries", plot_interaction_by_boundary),
        ("top_features", "feature_effects", plot_top_features),
        ("ablation_curve", "feature_effects", plot_ablation_curve),
        ("forced_contrasts", "forced_summaries", plot_forced_contrasts),
        ("continuation_by_n", "continuation_summaries", plot_continuation_by_n),
        ("interpolation", "offmanifold", plot_interpolation),
        ("baselines", "baselines", plot_baselines),
        ("lineage", "lineage", plot_lineage),
        ("closure", "closure", plot_closure),
        ("handoff_dose", "handoff", plot_handoff_dose),
        ("handoff_windows", "handoff", plot_handoff_windows),
    ]
    written = []
    for name, table, plot in plan:
        data = tables.get(table)
        if data is None or data.num_rows == 0:
            continue
        try:
            path = plot(data, out_dir / f"{name}.png")
        except Exception:
            log.exception("figure %s failed; skipped", name)
            continue
        if path is not None:
            written.append(path)
    return written


def write_job_figures(results: ResultsStore, data_dir: Path, job_id: uuid.UUID | str) -> list[Path]:
    """Figures of one ingested job from its rows in the results store. Never raises."""
    try:
        tables = {
            t: results.job_table(t, str(job_id), limit=MAX_ROWS)
            for t in (
                "summaries",
                "feature_effects",
                "forced_summaries",
                "continuation_summaries",
                "offmanifold",
                "baselines",
                "lineage",
                "closure",
                "handoff",
            )
        }
        return write_figures(tables, figures_dir(data_dir, job_id))
    except Exception:
        log.exception("job %s: figures failed; the job's results are unaffected", job_id)
        return []


def list_figures(data_dir: Path, job_id: uuid.UUID | str) -> list[Path]:
    """A job's figure files, by name."""
    root = figures_dir(data_dir, job_id)
    return sorted(p for p in root.glob("*.png") if p.is_file()) if root.is_dir() else []
