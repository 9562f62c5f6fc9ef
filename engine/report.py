"""Plain-text rendering of summaries: the per-family 2x2 table with CIs that the CLI and demo print."""

from __future__ import annotations

import pyarrow as pa

from crosspatch.engine.results import CELL_COLUMNS, EFFECT_COLUMNS

_SHORT = {
    "y_ptup_ptlate": "Y[PT,PT]",
    "y_ptup_itlate": "Y[PT,IT]",
    "y_itup_ptlate": "Y[IT,PT]",
    "y_itup_itlate": "Y[IT,IT]",
    "pt_late_effect": "PT-up late",
    "it_late_effect": "IT-up late",
    "interaction": "interaction",
}


def _ci(r: dict) -> str:
    return f"{r['estimate']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"


def format_summary(summary: pa.Table, subset: str = "all") -> str:
    """One block per (boundary, readout): a row per family with cells, effects (95% CI), n and p."""
    rows = [r for r in summary.to_pylist() if r["subset"] == subset]
    if not rows:
        return "(no diverged events: nothing to summarise)"
    groups: dict[tuple, dict[str, dict[str, dict]]] = {}
    for r in rows:
        groups.setdefault((r["readout"],), {}).setdefault(r["family"], {})[r["statistic"]] = r
    lines: list[str] = []
    w = max(10, *(len(r["family"]) for r in rows))
    for (readout,), families in groups.items():
        lines.append(f"readout: common-{readout.upper()}" if readout != "own" else "readout: own")
        header = f"{'family':<{w}} {'b':>3} {'n':>4} " + " ".join(f"{_SHORT[c]:>9}" for c in CELL_COLUMNS)
        header += "  " + "  ".join(f"{_SHORT[c]:<26}" for c in EFFECT_COLUMNS) + "  p(sign-flip)"
        lines.append(header)
        for family, stats in sorted(families.items(), key=lambda kv: (kv[0] == "__mean__", kv[0])):
            first = stats["interaction"]
            b = "-" if family == "__mean__" else str(first["boundary"])
            cells = " ".join(
                f"{stats[c]['estimate']:>+9.3f}" if c in stats and family != "__mean__" else f"{'':>9}"
                for c in CELL_COLUMNS
            )
            effects = "  ".join(f"{_ci(stats[c]):<26}" for c in EFFECT_COLUMNS)
            p = first["p_value"]
            name = "mean" if family == "__mean__" else family
            lines.append(
                f"{name:<{w}} {b:>3} {first['n']:>4} {cells}  {effects}  {'' if p is None else f'{p:.2g}'}"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def format_sweep(summary: pa.Table, readout: str = "it") -> str:
    """Interaction by boundary, one line per family x boundary (for sweeps)."""
    rows = [
        r
        for r in summary.to_pylist()
        if r["subset"] == "all"
        and r["statistic"] == "interaction"
        and r["readout"] == readout
        and r["family"] != "__mean__"
    ]
    lines = [f"{'family':<10} {'boundary':>8}  interaction [95% CI]"]
    for r in sorted(rows, key=lambda r: (r["family"], r["boundary"])):
        lines.append(f"{r['family']:<10} {r['boundary']:>8}  {_ci(r)}")
    return "\n".join(lines)


def _pick(rows: list[dict], intervention: str, statistic: str, k: int | None) -> dict | None:
    for r in rows:
        if r["intervention"] == intervention and r["statistic"] == statistic and (k is None or r["k"] == k):
            return r
    return None


def _ci_or_dash(r: dict | None, pct: bool = False) -> str:
    """`effect [lo, hi]`; an unavailable control (n = 0) or a share of an interaction whose CI covers 0 says so."""
    if r is None:
        return "-"
    if r["effect"] is None:
        if r.get("n") == 0:
            return "unavailable"
        return (
            "n/a (CI of the denominator covers 0)" if r["statistic"] in ("share", "rescue_fraction") else "-"
        )
    f = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    if r["ci_low"] is None:
        return f"{f * r['effect']:+.1f}{unit}" if pct else f"{r['effect']:+.3f}"
    if pct:
        return f"{f * r['effect']:+.1f}% [{f * r['ci_low']:+.1f}, {f * r['ci_high']:+.1f}]"
    return f"{r['effect']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"


def format_mediation(effects: pa.Table, n_top_features: int = 5) -> str:
    """Per family: interaction on the test split, top-k ablation share vs matched-random, rescue, top features."""
    rows = effects.to_pylist()
    lines = [
        f"{'family':<10} {'interaction (test)':<26} {'k':>4}  {'top-k ablation share':<26} {'matched-random':<15} "
        f"{'rescue fraction':<26} top features (latent: score)"
    ]
    for family in sorted({r["family"] for r in rows}):
        fr = [r for r in rows if r["family"] == family]
        set_ks = sorted({r["k"] for r in fr if r["intervention"] == "ablate_topk"})
        k = set_ks[-1] if set_ks else None
        top = sorted((r for r in fr if r["intervention"] == "attribution"), key=lambda r: r["k"])[
            :n_top_features
        ]
        feats = ", ".join(f"{r['latent']}: {r['effect']:+.3g}" for r in top) or "-"
        base = _pick(fr, "baseline", "interaction", None)
        if base is not None and base["ci_low"] is not None and base["ci_low"] <= 0 <= base["ci_high"]:
            # a share of an interaction indistinguishable from 0 means nothing: say so instead
            lines.append(
                f"{family:<10} {_ci_or_dash(base):<26} {k if k else '-':>4}  "
                f"{'n/a: no interaction to mediate (CI covers 0)':<68} {feats}"
            )
            continue
        lines.append(
            f"{family:<10} {_ci_or_dash(_pick(fr, 'baseline', 'interaction', None)):<26} {k if k else '-':>4}  "
            f"{_ci_or_dash(_pick(fr, 'ablate_topk', 'share', k), pct=True):<26} "
            f"{_ci_or_dash(_pick(fr, 'ablate_matched_random', 'share', k), pct=True):<15} "
            f"{_ci_or_dash(_pick(fr, 'rescue_topk', 'rescue_fraction', k), pct=True):<26} {feats}"
        )
    return "\n".join(lines)


def format_checks(checks: list[dict], controls: dict | None = None) -> str:
    """The causal gate checks by name (value, threshold, passed) and any control that was unavailable."""
    lines = ["causal gate checks (method 5.1):"]
    for c in checks:
        verdict = "passed" if c["passed"] else "FAILED"
        value = "-" if c["value"] is None else f"{c['value']:+.4g}"
        lines.append(f"  {c['name']:<22} {value:>10}  threshold {c['threshold']:g}  {verdict}: {c['detail']}")
    for k, st in sorted(((controls or {}).get("matched_random", {}).get("by_k", {})).items()):
        if not st["available"]:
            lines.append(f"  note: matched-random control unavailable at k={k}: {st['reason']}")
    return "\n".join(lines)


def format_effects(effects: pa.Table, limit: int = 20) -> str:
    """Every set-level effect (share, rescue fraction, drops with CIs) and the top features by attribution.

    Set sizes are the real sizes; shares print only where the interaction CI excludes 0.
    """
    rows = effects.to_pylist()
    lines = [f"{'intervention':<28} {'k':>4}  {'statistic':<18} effect [95% CI]"]
    for r in rows:
        if r["latent"] is None and r["statistic"] in (
            "share",
            "rescue_fraction",
            "interaction_drop",
            "interaction",
        ):
            lines.append(f"{r['intervention']:<28} {r['k']:>4}  {r['statistic']:<18} {_ci_or_dash(r)}")
    top = sorted((r for r in rows if r["intervention"] == "attribution"), key=lambda r: r["k"])[:limit]
    lines.append(f"\ntop {len(top)} features by attribution (IT-up minus PT-up, fit split)")
    held = {
        (r["dictionary_id"], r["latent"]): r
        for r in rows
        if r["intervention"] == "ablate_single" and r["statistic"] == "interaction_drop"
    }
    lines += [
        f"  #{r['k']:<4} {r['dictionary_id']}:{r['latent']:<6} layer {r['layer']}  score {r['effect']:+.4g}"
        + (
            f"  held-out drop {_ci_or_dash(held[key])} (n={held[key]['n']})"
            if (key := (r["dictionary_id"], r["latent"])) in held
            else ""
        )
        for r in top
    ]
    return "\n".join(lines)
