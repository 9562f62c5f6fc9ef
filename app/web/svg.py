"""Server-rendered SVG charts (no JavaScript, no external assets): estimates with CIs, curves, histograms.

Every chart gets a <title> and <desc> for screen readers; the page shows the same numbers in a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

PALETTE = ("#1f4e9c", "#b3461b", "#2d7d46", "#6b3fa0", "#8a6d00", "#9c1f4e")  # >= 4.5:1 on white
INK, GRID, MUTED = "#1a1a1a", "#c8c8c8", "#4a4a4a"


@dataclass(frozen=True)
class Interval:
    """One estimate with its CI (bounds may be missing) and the group (family) it belongs to."""

    label: str
    estimate: float | None
    lo: float | None
    hi: float | None
    group: str = ""


def fmt(x: float | None, digits: int = 4) -> str:
    """A number as the pages print it (significant digits; '-' for missing or not finite)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e15):
        return str(int(x))
    return f"{x:.{digits}g}"


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _scale(lo: float, hi: float, a: float, b: float):  # type: ignore[no-untyped-def]
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _frame(width: int, height: int, title: str, desc: str, body: list[str]) -> Markup:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} {height}" '
        f'width="100%" preserveAspectRatio="xMinYMin meet" class="chart">'
        f"<title>{escape(title)}</title><desc>{escape(desc)}</desc>"
    )
    return Markup(head + "".join(body) + "</svg>")


def forest(rows: Sequence[Interval], title: str, xlabel: str = "estimate") -> Markup:
    """Estimates as dots with CI whiskers, one row each, a zero line, colour by group."""
    if not rows:
        return Markup("")
    label_w, width, row_h, top = 230, 760, 24, 28
    height = top + row_h * len(rows) + 36
    values = _finite([v for r in rows for v in (r.estimate, r.lo, r.hi)] + [0.0])
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or 1.0
    x = _scale(lo - pad, hi + pad, label_w, width - 20)
    groups = list(dict.fromkeys(r.group for r in rows))
    body = [
        f'<line x1="{x(0):.1f}" y1="{top - 8}" x2="{x(0):.1f}" y2="{height - 30}" stroke="{MUTED}" stroke-dasharray="4 3"/>'
    ]
    for t in _ticks(lo - pad, hi + pad):
        body.append(
            f'<text x="{x(t):.1f}" y="{height - 14}" font-size="11" text-anchor="middle" fill="{MUTED}">{fmt(t, 3)}</text>'
        )
    body.append(
        f'<text x="{(label_w + width) / 2:.0f}" y="{height - 1}" font-size="11" text-anchor="middle" fill="{INK}">{escape(xlabel)}</text>'
    )
    for i, r in enumerate(rows):
        y = top + i * row_h + row_h / 2
        colour = PALETTE[groups.index(r.group) % len(PALETTE)]
        text = f"{r.label}: {fmt(r.estimate)} [{fmt(r.lo)}, {fmt(r.hi)}]"
        body.append(f"<g><title>{escape(text)}</title>")
        body.append(
            f'<text x="{label_w - 8}" y="{y + 4:.1f}" font-size="12" text-anchor="end" fill="{INK}">{escape(r.label)}</text>'
        )
        if r.lo is not None and r.hi is not None and math.isfinite(r.lo) and math.isfinite(r.hi):
            body.append(
                f'<line x1="{x(r.lo):.1f}" y1="{y:.1f}" x2="{x(r.hi):.1f}" y2="{y:.1f}" stroke="{colour}" stroke-width="2"/>'
            )
        if r.estimate is not None and math.isfinite(r.estimate):
            body.append(f'<circle cx="{x(r.estimate):.1f}" cy="{y:.1f}" r="4.5" fill="{colour}"/>')
        body.append("</g>")
    desc = "; ".join(f"{r.label} {fmt(r.estimate)} [{fmt(r.lo)}, {fmt(r.hi)}]" for r in rows[:40])
    return _frame(width, height, title, desc, body)


def curves(
    series: dict[str, Sequence[tuple[float, float | None, float | None, float | None]]],
    title: str,
    xlabel: str,
    ylabel: str,
) -> Markup:
    """Lines over x (e.g. the boundary sweep) with shaded CI bands, one colour per series."""
    points = [p for s in series.values() for p in s]
    if not points:
        return Markup("")
    width, height, left, right, top, bottom = 760, 300, 60, 150, 16, 40
    xs = [p[0] for p in points]
    ys = _finite([v for p in points for v in p[1:]] + [0.0])
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.05 or 1.0
    sx = _scale(min(xs), max(xs), left, width - right)
    sy = _scale(ylo - pad, yhi + pad, height - bottom, top)
    body = [
        f'<line x1="{left}" y1="{sy(0):.1f}" x2="{width - right}" y2="{sy(0):.1f}" stroke="{MUTED}" stroke-dasharray="4 3"/>'
    ]
    for t in _ticks(ylo - pad, yhi + pad):
        body.append(
            f'<line x1="{left}" y1="{sy(t):.1f}" x2="{width - right}" y2="{sy(t):.1f}" stroke="{GRID}" stroke-width="0.5"/>'
            f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" font-size="11" text-anchor="end" fill="{MUTED}">{fmt(t, 3)}</text>'
        )
    for t in sorted(set(xs)):
        body.append(
            f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" font-size="11" text-anchor="middle" fill="{MUTED}">{fmt(t)}</text>'
        )
    body.append(
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" font-size="11" text-anchor="middle" fill="{INK}">{escape(xlabel)}</text>'
        f'<text x="12" y="{(top + height - bottom) / 2:.0f}" font-size="11" text-anchor="middle" fill="{INK}" '
        f'transform="rotate(-90 12 {(top + height - bottom) / 2:.0f})">{escape(ylabel)}</text>'
    )
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = sorted(pts)
        band = [(p[0], p[2], p[3]) for p in pts if p[2] is not None and p[3] is not None]
        if len(band) > 1:
            poly = [f"{sx(a):.1f},{sy(hi):.1f}" for a, _, hi in band] + [
                f"{sx(a):.1f},{sy(lo):.1f}" for a, lo, _ in reversed(band)
            ]
            body.append(f'<polygon points="{" ".join(poly)}" fill="{colour}" fill-opacity="0.15"/>')
        line = [f"{sx(p[0]):.1f},{sy(p[1]):.1f}" for p in pts if p[1] is not None]
        body.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for p in pts:
            if p[1] is not None:
                body.append(
                    f'<circle cx="{sx(p[0]):.1f}" cy="{sy(p[1]):.1f}" r="3" fill="{colour}">'
                    f"<title>{escape(name)} at {fmt(p[0])}: {fmt(p[1])} [{fmt(p[2])}, {fmt(p[3])}]</title></circle>"
                )
        body.append(
            f'<text x="{width - right + 8}" y="{top + 14 + 16 * i}" font-size="12" fill="{colour}">{escape(name)}</text>'
        )
    desc = "; ".join(
        f"{name}: " + ", ".join(f"{fmt(p[0])}: {fmt(p[1])}" for p in sorted(pts))
        for name, pts in series.items()
    )
    return _frame(width, height, title, desc, body)


def histogram(bins: Sequence[tuple[float, float, int]], title: str, xlabel: str) -> Markup:
    """Bars of counts over [lo, hi) bins."""
    if not bins:
        return Markup("")
    width, height, left, bottom, top = 560, 200, 40, 36, 10
    peak = max(c for _, _, c in bins) or 1
    sx = _scale(bins[0][0], bins[-1][1], left, width - 40)
    sy = _scale(0, peak, height - bottom, top)
    body = []
    for lo, hi, c in bins:
        body.append(
            f'<rect x="{sx(lo):.1f}" y="{sy(c):.1f}" width="{max(sx(hi) - sx(lo) - 1, 1):.1f}" '
            f'height="{sy(0) - sy(c):.1f}" fill="{PALETTE[0]}"><title>[{fmt(lo)}, {fmt(hi)}): {c}</title></rect>'
        )
    for v in (bins[0][0], bins[-1][1]):
        body.append(
            f'<text x="{sx(v):.1f}" y="{height - bottom + 14}" font-size="11" text-anchor="middle" fill="{MUTED}">{fmt(v, 3)}</text>'
        )
    body.append(
        f'<text x="{left - 6}" y="{top + 10}" font-size="11" text-anchor="end" fill="{MUTED}">{peak}</text>'
        f'<text x="{(left + width) / 2:.0f}" y="{height - 4}" font-size="11" text-anchor="middle" fill="{INK}">{escape(xlabel)}</text>'
    )
    desc = "; ".join(f"[{fmt(lo)}, {fmt(hi)}): {c}" for lo, hi, c in bins)
    return _frame(width, height, title, desc, body)
