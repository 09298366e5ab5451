"""Inline SVG charts drawn in Python, so report.html needs no JS library and no network.

Three shapes cover the report: a line chart (flows per second, latency
percentiles over time), a bar chart (a latency histogram per API) and a
timeline (one device's provisioning steps). Output is deterministic text:
the same data always gives the same markup, so a re-rendered report is
byte-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PASS_COLOR = "#1a7f37"
FAIL_COLOR = "#cf222e"
SERIES_COLORS = ("#0969da", "#bf8700", "#cf222e", "#8250df", "#1a7f37")

_FONT = 'font-family="system-ui,sans-serif" font-size="11"'


@dataclass(frozen=True)
class Line:
    """One series of a line chart; ``None`` values leave a gap."""

    label: str
    color: str
    points: Sequence[tuple[float, float | None]]


@dataclass(frozen=True)
class Bar:
    label: str
    value: float


@dataclass(frozen=True)
class Span:
    """One timeline row: starts ``start`` seconds into the timeline, lasts ``duration`` s."""

    label: str
    start: float
    duration: float | None
    ok: bool
    note: str = ""


def fmt_num(value: float) -> str:
    """Short, stable number text for axes and labels."""
    if value == 0:
        return "0"
    if abs(value) >= 1000 and value == int(value):
        return f"{int(value):,}".replace(",", " ")
    if abs(value) >= 100:
        return f"{value:.0f}"
    text = f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[low, high]`` (the first <= low, the last >= high)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value < high + step * 0.999:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _svg_open(chart_id: str, title: str, width: int, height: int) -> list[str]:
    return [
        f'<svg class="chart" id="{escape(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
        f'role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" {_FONT}>',
        f"<title>{escape(title)}</title>",
        f'<text x="{width / 2:.0f}" y="14" text-anchor="middle" font-size="13" '
        f'font-weight="600">{escape(title)}</text>',
    ]


def _empty(chart_id: str, title: str, width: int, height: int) -> str:
    parts = _svg_open(chart_id, title, width, height)
    parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" '
                 'fill="#6e7781">no data</text></svg>')
    return "".join(parts)


def line_chart(chart_id: str, title: str, lines: Sequence[Line], *, x_label: str,
               y_label: str, width: int = 580, height: int = 260) -> str:
    """A line chart with axes, ticks and a legend."""
    xs = [x for line in lines for x, _ in line.points]
    ys = [y for line in lines for _, y in line.points if y is not None]
    if not xs or not ys:
        return _empty(chart_id, title, width, height)
    left, right, top, bottom = 56, 16, 40, 40
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(0.0, max(ys) * 1.05 or 1.0)
    x0, x1, y1 = x_ticks[0], x_ticks[-1], y_ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1.0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - y / (y1 or 1.0) * plot_h

    parts = _svg_open(chart_id, title, width, height)
    for tick in y_ticks:
        y = py(tick)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#d0d7de" stroke-width="0.5"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f"{fmt_num(tick)}</text>")
    for tick in x_ticks:
        x = px(tick)
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                     f"{fmt_num(tick)}</text>")
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#57606a"/>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" '
                 f'y2="{top + plot_h}" stroke="#57606a"/>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">'
                 f"{escape(x_label)}</text>")
    parts.append(f'<text transform="translate(12,{top + plot_h / 2:.0f}) rotate(-90)" '
                 f'text-anchor="middle">{escape(y_label)}</text>')
    for line in lines:
        runs: list[list[str]] = [[]]
        for point_x, point_y in line.points:
            if point_y is None:
                runs.append([])
            else:
                runs[-1].append(f"{px(point_x):.1f},{py(point_y):.1f}")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{line.color}"/>')
            elif run:
                parts.append(f'<polyline class="series" fill="none" stroke="{line.color}" '
                             f'stroke-width="1.8" points="{" ".join(run)}"/>')
    legend_x = left + 8
    for line in lines:
        parts.append(f'<rect x="{legend_x}" y="24" width="10" height="10" fill="{line.color}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="33">{escape(line.label)}</text>')
        legend_x += 24 + 7 * len(line.label)
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(chart_id: str, title: str, bars: Sequence[Bar], *, x_label: str, y_label: str,
              color: str = SERIES_COLORS[0], width: int = 580, height: int = 240) -> str:
    """A vertical bar chart (used for latency histograms)."""
    if not bars:
        return _empty(chart_id, title, width, height)
    left, right, top, bottom = 56, 16, 28, 56
    plot_w, plot_h = width - left - right, height - top - bottom
    y_ticks = nice_ticks(0.0, max(b.value for b in bars) or 1.0)
    y1 = y_ticks[-1] or 1.0
    slot = plot_w / len(bars)
    label_every = max(1, math.ceil(len(bars) / 12))
    parts = _svg_open(chart_id, title, width, height)
    for tick in y_ticks:
        y = top + plot_h - tick / y1 * plot_h
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#d0d7de" stroke-width="0.5"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f"{fmt_num(tick)}</text>")
    for i, bar in enumerate(bars):
        h = bar.value / y1 * plot_h
        x = left + i * slot + slot * 0.1
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{top + plot_h - h:.1f}" '
                     f'width="{slot * 0.8:.1f}" height="{h:.1f}" fill="{color}">'
                     f"<title>{escape(bar.label)}: {fmt_num(bar.value)}</title></rect>")
        if i % label_every == 0:
            cx = left + (i + 0.5) * slot
            parts.append(f'<text transform="translate({cx:.1f},{top + plot_h + 12}) '
                         f'rotate(-30)" text-anchor="end">{escape(bar.label)}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" '
                 f'y2="{top + plot_h}" stroke="#57606a"/>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 4}" text-anchor="middle">'
                 f"{escape(x_label)}</text>")
    parts.append(f'<text transform="translate(12,{top + plot_h / 2:.0f}) rotate(-90)" '
                 f'text-anchor="middle">{escape(y_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def timeline(chart_id: str, title: str, spans: Sequence[Span], *, width: int = 640) -> str:
    """One row per step: a bar from its start for its duration (a diamond for an instant)."""
    row_h, top, left, right = 20, 24, 170, 70
    height = top + row_h * max(len(spans), 1) + 26
    if not spans:
        return _empty(chart_id, title, width, height)
    end = max(s.start + (s.duration or 0.0) for s in spans)
    ticks = nice_ticks(0.0, end or 0.001, 4)
    scale_end = ticks[-1] or 1.0
    unit, factor = ("ms", 1000.0) if scale_end < 2 else ("s", 1.0)
    plot_w = width - left - right

    def px(t: float) -> float:
        return left + t / scale_end * plot_w

    parts = _svg_open(chart_id, title, width, height)
    axis_y = top + row_h * len(spans) + 4
    for tick in ticks:
        x = px(tick)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{axis_y}" '
                     'stroke="#d0d7de" stroke-width="0.5"/>')
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 14}" text-anchor="middle">'
                     f"{fmt_num(tick * factor)} {unit}</text>")
    for i, span in enumerate(spans):
        y = top + i * row_h
        color = PASS_COLOR if span.ok else FAIL_COLOR
        parts.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end">'
                     f"{escape(span.label)}</text>")
        x = px(span.start)
        if span.duration is None:
            parts.append(f'<path class="step" d="M{x:.1f} {y + 4} l6 6 l-6 6 l-6 -6 z" '
                         f'fill="{color}"><title>{escape(span.label)}</title></path>')
            text_x = x + 10
        else:
            w = max(span.duration / scale_end * plot_w, 2.0)
            parts.append(f'<rect class="step" x="{x:.1f}" y="{y + 4}" width="{w:.1f}" '
                         f'height="{row_h - 8}" rx="2" fill="{color}">'
                         f"<title>{escape(span.label)}</title></rect>")
            text_x = x + w + 4
        note = span.note or ("" if span.duration is None
                             else f"{fmt_num(span.duration * 1000)} ms")
        if note:
            parts.append(f'<text x="{min(text_x, width - 4):.1f}" y="{y + 14}" '
                         f'fill="#57606a">{escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)
