"""Plain-text rendering of summaries: the per-family 2x2 table with CIs that the CLI and demo print."""

from __future__ import annotations

import pyarrow as pa

from engine.results import CELL_COLUMNS, EFFECT_COLUMNS

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
