"""Line charts as inline SVG (no JavaScript, no external file): the run page and the report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 190, 16, 32


@dataclass(frozen=True)
class Line:
    """One series: its label, (x, y) points (y None: no value), dashed or solid."""

    label: str
    points: tuple[tuple[float, float | None], ...]
    dashed: bool = False
    colour: str = PALETTE[0]


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, int | float) and math.isfinite(v)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = (hi - lo) / (n - 1)
    return [lo + i * step for i in range(n)]


def line_chart(title: str, lines: list[Line], y_label: str = "",
               y_range: tuple[float, float] | None = None) -> str:
    """An SVG line chart; each line also listed in a legend; empty data says so."""
    ys = [float(y) for ln in lines for _, y in ln.points if y is not None and _finite(y)]
    xs = [x for ln in lines for x, y in ln.points if _finite(y)]
    head = (f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}'
            "</title>")
    if not ys:
        return head + (f'<text x="{WIDTH // 2}" y="{HEIGHT // 2}" text-anchor="middle">'
                       f"{escape(title)}: no values yet</text></svg>")
    lo, hi = y_range if y_range is not None else (min(ys), max(ys))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (y - lo) / (hi - lo)) * plot_h

    parts = [head, f'<text x="{LEFT}" y="11" class="chart-title">{escape(title)}</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
             'stroke="#999"/>']
    for t in _ticks(lo, hi):
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(t):.1f}" '
                     f'y2="{py(t):.1f}" stroke="#eee"/>'
                     f'<text x="{LEFT - 4}" y="{py(t) + 4:.1f}" text-anchor="end" '
                     f'font-size="10">{t:.2f}</text>')
    x_ticks = sorted({int(round(x)) for x in _ticks(x_lo, x_hi, min(6, int(x_hi - x_lo) + 1))})
    for t in x_ticks:
        parts.append(f'<text x="{px(t):.1f}" y="{TOP + plot_h + 14}" text-anchor="middle" '
                     f'font-size="10">{t}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 4}" text-anchor="middle" '
                 'font-size="11">round</text>')
    if y_label:
        parts.append(f'<text x="12" y="{TOP + plot_h / 2:.0f}" font-size="11" '
                     f'transform="rotate(-90 12 {TOP + plot_h / 2:.0f})" '
                     f'text-anchor="middle">{escape(y_label)}</text>')
    for i, ln in enumerate(lines):
        dash = ' stroke-dasharray="5 3"' if ln.dashed else ""
        segment: list[str] = []
        segments: list[list[str]] = []
        for x, y in ln.points:
            if y is not None and _finite(y):
                segment.append(f"{px(x):.1f},{py(float(y)):.1f}")
            elif segment:
                segments.append(segment)
                segment = []
        if segment:
            segments.append(segment)
        for seg in segments:
            parts.append(f'<polyline fill="none" stroke="{ln.colour}" stroke-width="1.6"'
                         f'{dash} points="{" ".join(seg)}"/>')
        ly = TOP + 12 + i * 15
        if ly < HEIGHT - 8:
            lx = LEFT + plot_w + 10
            parts.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" '
                         f'stroke="{ln.colour}" stroke-width="2"{dash}/>'
                         f'<text x="{lx + 22}" y="{ly}" font-size="10">{escape(ln.label)}'
                         f'{"" if segments else " (undefined)"}</text>')
    parts.append("</svg>")
    return "".join(parts)
