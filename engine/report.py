"""Plain-text rendering of summaries: the per-family 2x2 table with CIs that the CLI and demo print."""

from __future__ import annotations

import pyarrow as pa

from crosspatch.engine.results import CELL_COLUMNS, EFFECT_COLUMNS
from crosspatch.engine.stats import format_p

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


def _name(r: dict) -> str:
    """Row label: the pair id, 'family F (m pairs)', or 'family-balanced'."""
    if r["level"] == "pair":
        return r["pair_id"]
    if r["level"] == "family":
        return f"family {r['family']} ({r['n_pairs']} pairs)"
    return "family-balanced"


def format_summary(summary: pa.Table, subset: str = "all") -> str:
    """Per readout, at each pair's headline boundary: a row per pair, per family with several pairs, and
    the family-balanced mean; cells, effects (95% CI), n and the sign-flip p ("≤" marks the floor)."""
    rows = [r for r in summary.to_pylist() if r["subset"] == subset and r["headline"]]
    rows = [r for r in rows if r["level"] != "family" or r["n_pairs"] > 1]
    if not rows:
        return "(no diverged events: nothing to summarise)"
    groups: dict[str, dict[tuple, dict[str, dict]]] = {}
    for r in rows:
        key = ({"pair": 0, "family": 1, "balanced": 2}[r["level"]], r["family"] or "", r["pair_id"] or "")
        groups.setdefault(r["readout"], {}).setdefault(key, {})[r["statistic"]] = r
    lines: list[str] = []
    w = max(12, *(len(_name(r)) for r in rows))
    for readout, entries in groups.items():
        lines.append(f"readout: common-{readout.upper()}" if readout != "own" else "readout: own")
        header = f"{'pair / family':<{w}} {'family':<8} {'b*':>3} {'depth':>5} {'n':>5} "
        header += " ".join(f"{_SHORT[c]:>9}" for c in CELL_COLUMNS)
        header += "  " + "  ".join(f"{_SHORT[c]:<26}" for c in EFFECT_COLUMNS) + "  p(sign-flip)"
        lines.append(header)
        for _, stats in sorted(entries.items()):
            first = stats["interaction"]
            b = "-" if first["boundary"] is None else str(first["boundary"])
            depth = "-" if first["depth"] is None else f"{first['depth']:.2f}"
            cells = " ".join(
                f"{stats[c]['estimate']:>+9.3f}" if c in stats else f"{'':>9}" for c in CELL_COLUMNS
            )
            effects = "  ".join(f"{_ci(stats[c]):<26}" for c in EFFECT_COLUMNS)
            p = format_p(first["p_value"], first["n_permutations"])
            lines.append(
                f"{_name(first):<{w}} {first['family'] or '-':<8} {b:>3} {depth:>5} {first['n']:>5} "
                f"{cells}  {effects}  {p}"
            )
        lines.append("")
    lines += _secondary_lines(rows)
    lines.append(
        "b* = each pair's headline boundary (round(0.6 L) unless the job named one); family rows: mean of "
        "its pairs, family-balanced: mean of families (normal-approximation CIs)"
    )
    return "\n".join(lines).rstrip()


def _share(r: dict | None) -> str:
    if r is None or r["estimate"] != r["estimate"]:
        return "n/a"
    ci = "" if r["ci_low"] != r["ci_low"] else f" [{r['ci_low']:.1%}, {r['ci_high']:.1%}]"
    return f"{r['estimate']:.1%}{ci}"


def _secondary_lines(rows: list[dict]) -> list[str]:
    """Portable share and interaction share (ratios of means, method 2.2) per headline row, and the pooled
    across-family sign-flip p of the family-balanced interaction."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (
            r["readout"],
            {"pair": 0, "family": 1, "balanced": 2}[r["level"]],
            r["family"] or "",
            r["pair_id"] or "",
        )
        by.setdefault(key, {})[r["statistic"]] = r
    out = []
    for (readout, *_), stats in sorted(by.items()):
        if "portable_share" not in stats and "interaction_share" not in stats:
            continue
        first = stats.get("interaction") or next(iter(stats.values()))
        line = (
            f"  [{readout}] {_name(first)}: portable share (PT-up/IT-up late) "
            f"{_share(stats.get('portable_share'))}; interaction share (interaction/diagonal) "
            f"{_share(stats.get('interaction_share'))}"
        )
        if first["level"] == "balanced" and first.get("p_value") is not None:
            line += f"; pooled sign-flip p {format_p(first['p_value'], first['n_permutations'])}"
        out.append(line)
    if not out:
        return []
    head = "secondary scales (ratios of means, bootstrap CIs; balanced = ratio of the family-balanced means)"
    return [head, *out, ""]


def format_sweep(summary: pa.Table, readout: str = "it", subset: str = "all") -> str:
    """Interaction by boundary per pair (headline marked, Holm-adjusted p, sweep-wide p), then the
    family-balanced interaction at each relative depth every pair swept."""
    rows = [
        r
        for r in summary.to_pylist()
        if r["subset"] == subset and r["statistic"] == "interaction" and r["readout"] == readout
    ]
    pairs = sorted({r["pair_id"] for r in rows if r["level"] == "pair"})
    lines = [
        f"{'pair':<28} {'boundary':>8} {'depth':>5}  {'interaction [95% CI]':<26}  {'p':>9}  {'p(Holm)':>9}"
    ]
    for pair_id in pairs:
        mine = sorted((r for r in rows if r["pair_id"] == pair_id), key=lambda r: r["boundary"])
        for r in mine:
            mark = "*" if r["headline"] else " "
            lines.append(
                f"{pair_id:<28} {r['boundary']:>7}{mark} {r['depth']:>5.2f}  {_ci(r):<26}  "
                f"{format_p(r['p_value'], r['n_permutations']):>9}  "
                f"{format_p(r['p_adjusted'], r['n_permutations']):>9}"
            )
        if mine and mine[0]["p_sweep"] is not None:
            lines.append(
                f"{'':<28} sweep-wide p (max over {len(mine)} boundaries, same sign flips): "
                f"{format_p(mine[0]['p_sweep'], mine[0]['n_permutations'])}"
            )
    depth_rows = sorted(
        (r for r in rows if r["level"] == "balanced" and not r["headline"]), key=lambda r: r["depth"]
    )
    if depth_rows:
        lines.append("\nfamily-balanced interaction at relative depths b/L every pair swept (exact match)")
        lines += [f"  depth {r['depth']:.3f}  {_ci(r)}  ({r['n_pairs']} pairs)" for r in depth_rows]
    lines.append("* headline boundary")
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


def format_event_counts(events: list) -> str:
    """One line: scored events of all prompts (with how many are near ties, where flagged), and each
    unscored reason (token_mismatch split by check)."""
    reasons: dict[str, int] = {}
    checks: dict[str, int] = {}
    for e in events:
        if e.diverged:
            continue
        reasons[e.reason] = reasons.get(e.reason, 0) + 1
        if e.token_check:
            checks[e.token_check] = checks.get(e.token_check, 0) + 1
    parts = [f"{r} {n}" for r, n in sorted(reasons.items())]
    if checks:
        detail = ", ".join(f"{c} {n}" for c, n in sorted(checks.items()))
        parts = [f"{p} ({detail})" if p.startswith("token_mismatch ") else p for p in parts]
    scored = sum(e.diverged for e in events)
    flagged = [e for e in events if e.diverged and getattr(e, "near_tie", None) is not None]
    ties = f" ({sum(e.near_tie for e in flagged)} near ties)" if flagged else ""
    return f"events: {scored}/{len(events)} prompts scored{ties}" + (
        f"; not scored: {', '.join(parts)}" if parts else ""
    )


def format_forced(summary: pa.Table, view: str = "suffix") -> str:
    """Forced-token contrasts (§6.1): per category, success(IT token) - success(PT token) [95% CI], n events,
    each branch's success rate; per pair and family-balanced."""
    rows = [r for r in summary.to_pylist() if r["view"] == view]
    contrasts = [r for r in rows if r["statistic"] == "contrast"]
    if not contrasts:
        return "(forced tokens: no objectively scoreable events)"
    rates = {(r["level"], r["pair_id"], r["category"], r["statistic"]): r["mean"] for r in rows}
    branches = sorted({r["statistic"][8:] for r in rows if r["statistic"].startswith("success_")})
    head = f"{'category':<16} {'pair':<24} {'contrast [95% CI]':<28} {'n':>5}  " + " ".join(
        f"{b:>13}" for b in branches
    )
    lines = [f"forced-token contrast ({view}: IT-token minus PT-token success)", head]
    for r in sorted(contrasts, key=lambda r: (r["category"], r["level"] == "balanced", r["pair_id"] or "")):
        who = r["pair_id"] if r["level"] == "pair" else f"family-balanced ({r['n_families']})"
        ci = f"{r['mean']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        success = " ".join(
            f"{rates.get((r['level'], r['pair_id'], r['category'], 'success_' + b), float('nan')):>13.3f}"
            for b in branches
        )
        lines.append(f"{r['category']:<16} {who:<24} {ci:<28} {r['n_events']:>5}  {success}")
    return "\n".join(lines)


def format_continuation(summary: pa.Table) -> str:
    """Constrained continuation (§6.2): C_N interaction and tail-only C_N [95% CI] per pair x variant x N."""
    rows = summary.to_pylist()
    if not rows:
        return "(continuation: no events)"
    get = {(r["pair_id"], r["variant"], r["n"], r["statistic"]): r for r in rows}
    lines = [f"{'pair':<24} {'variant':<14} {'N':>3} {'C_N interaction':<28} {'tail-only':<28} {'n':>5}"]
    for pair_id, variant, n in sorted({(r["pair_id"], r["variant"], r["n"]) for r in rows}):
        full, tail = (
            get.get((pair_id, variant, n, "interaction")),
            get.get((pair_id, variant, n, "tail_interaction")),
        )
        fmt = "--" if tail is None else f"{tail['mean']:+.3f} [{tail['ci_low']:+.3f}, {tail['ci_high']:+.3f}]"
        main = (
            "--" if full is None else f"{full['mean']:+.3f} [{full['ci_low']:+.3f}, {full['ci_high']:+.3f}]"
        )
        count = (full or tail)["n_events"]
        lines.append(f"{pair_id:<24} {variant:<14} {n:>3} {main:<28} {fmt:<28} {count:>5}")
    return "\n".join(lines)


def format_handoff(table: pa.Table) -> str:
    """The handoff chain (engine.handoff) of one pair: gate vs controls, dose-response, window grafts."""
    rows = [r for r in table.to_pylist() if r["level"] == "pair"]

    def get(**where: object) -> dict | None:
        hits = [r for r in rows if all(r[k] == v for k, v in where.items())]
        return hits[0] if hits else None

    controls = ("matched_random", "top_active_noncausal")  # the gate's controls (same-delta: grafts only)
    lines = ["handoff chain (method §5.4-5.5), held-out events:"]
    gate = get(analysis="gate", set_kind="topk", statistic="gate")
    support = get(analysis="gate", statistic="support_fraction")
    share = f", {support['effect']:.0%} of all" if support and support["effect"] is not None else ""
    lines.append(
        f"  gate drop(IT up) - drop(PT up): {_ci_or_dash(gate)}  (support {gate['n'] if gate else 0} events{share})"
    )
    for kind in controls:
        lines.append(
            f"    minus {kind}: {_ci_or_dash(get(analysis='gate', set_kind=kind, statistic='gate_excess'))}"
        )
    lines.append("  rescue dose-response (PT up, IT late):  alpha  gain  fraction")
    for r in rows:
        if r["analysis"] == "dose" and r["set_kind"] == "topk" and r["statistic"] == "rescue_gain":
            frac = get(analysis="dose", alpha=r["alpha"], set_kind="topk", statistic="rescue_fraction")
            lines.append(f"    {r['alpha']:>5g}  {_ci_or_dash(r)}  {_ci_or_dash(frac, pct=True)}")
    lines.append("  MLP-window grafts: window  total  mediated  mediated fraction (n finite)")
    for analysis in ("rescue_graft", "degrade_graft"):
        for r in rows:
            if r["analysis"] == analysis and r["statistic"] == "total":
                w = r["window_name"]
                med = get(analysis=analysis, window_name=w, set_kind="topk", statistic="mediated")
                frac = get(analysis=analysis, window_name=w, set_kind="topk", statistic="mediated_fraction")
                shown = _ci_or_dash(frac, pct=True)
                if frac is not None and frac["n"] == 0 and frac["effect"] is None:
                    shown = "n/a (no finite denominator)"
                lines.append(
                    f"    {analysis.split('_')[0]:<8} {w:<20} {_ci_or_dash(r)}  {_ci_or_dash(med)}  "
                    f"{shown} (n={frac['n'] if frac else 0})"
                )
    return "\n".join(lines)
