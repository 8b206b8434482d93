"""Small inline SVG charts for the HTML report (no JavaScript, no CDN: the file works offline)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 560, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 36, 48
COLORS = ("#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd")


@dataclass(frozen=True)
class Series:
    label: str
    points: list[tuple[float, float]]
    #: text drawn beside each point (e.g. the step's user count)
    point_labels: list[str] | None = None


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    ticks = [math.floor(low / step) * step]
    while ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


class _Frame:
    """Axes mapping data coordinates onto the plot area."""

    def __init__(self, xs: list[float], ys: list[float], x_from_zero: bool = True) -> None:
        self.xticks = nice_ticks(0.0 if x_from_zero else min(xs), max(xs))
        self.yticks = nice_ticks(0.0, max(ys))
        self.x0, self.x1 = self.xticks[0], self.xticks[-1]
        self.y0, self.y1 = self.yticks[0], self.yticks[-1]

    def x(self, value: float) -> float:
        return LEFT + (value - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        return HEIGHT - BOTTOM - (value - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)

    def axes(self, title: str, x_label: str, y_label: str, x_ticks: bool = True) -> list[str]:
        parts = [
            f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" class="title">{escape(title)}</text>',
            f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle">{escape(x_label)}</text>',
            f'<text transform="translate(14 {(HEIGHT - BOTTOM + TOP) / 2}) rotate(-90)" '
            f'text-anchor="middle">{escape(y_label)}</text>',
        ]
        for tick in self.yticks:
            y = self.y(tick)
            parts.append(
                f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(tick)}</text>'
            )
        if x_ticks:
            for tick in self.xticks:
                x = self.x(tick)
                y = HEIGHT - BOTTOM + 16
                parts.append(f'<text x="{x:.1f}" y="{y}" text-anchor="middle">{_fmt(tick)}</text>')
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" class="axis"/>'
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" y2="{HEIGHT - BOTTOM}" '
            'class="axis"/>'
        )
        return parts


def _svg(parts: list[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" role="img" aria-label="{escape(label)}">' + "".join(parts) + "</svg>"
    )


def _empty(title: str, message: str) -> str:
    return _svg(
        [
            f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" class="title">{escape(title)}</text>',
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="muted">'
            f"{escape(message)}</text>",
        ],
        title,
    )


def line_chart(
    title: str,
    series: list[Series],
    x_label: str,
    y_label: str,
    threshold: tuple[float, str] | None = None,
) -> str:
    """Lines with markers; an optional dashed horizontal threshold (e.g. the SLO)."""
    points = [p for s in series for p in s.points]
    if not points:
        return _empty(title, "no data")
    ys = [y for _, y in points]
    # A threshold far above the data would flatten it: then it is only named, not drawn.
    drawn = threshold is not None and threshold[0] <= 2 * max(ys)
    frame = _Frame([x for x, _ in points], ys + ([threshold[0]] if drawn else []))
    parts = frame.axes(title, x_label, y_label)
    if threshold is not None and drawn:
        y = frame.y(threshold[0])
        # Left, above the line; near the top (where the legend is), right and below it.
        x, anchor, dy = (LEFT + 6, "start", -5) if y - TOP > 50 else (WIDTH - RIGHT - 4, "end", 13)
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="threshold"/>'
            f'<text x="{x}" y="{y + dy:.1f}" text-anchor="{anchor}" class="threshold-label">'
            f"{escape(threshold[1])}</text>"
        )
    elif threshold is not None:
        parts.append(
            f'<text x="{WIDTH - RIGHT - 4}" y="{TOP + 12}" text-anchor="end" class="threshold-label">'
            f"{escape(threshold[1])}: above this range</text>"
        )
    for index, s in enumerate(series):
        color = COLORS[index % len(COLORS)]
        coords = [(frame.x(x), frame.y(y)) for x, y in s.points]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for i, (x, y) in enumerate(coords):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"/>')
            if s.point_labels and index == len(series) - 1:
                parts.append(
                    f'<text x="{x + 5:.1f}" y="{y - 6:.1f}" class="point-label">'
                    f"{escape(s.point_labels[i])}</text>"
                )
        legend_y = TOP + 4 + index * 16
        parts.append(
            f'<rect x="{LEFT + 10}" y="{legend_y}" width="12" height="3" fill="{color}"/>'
            f'<text x="{LEFT + 28}" y="{legend_y + 5}">{escape(s.label)}</text>'
        )
    return _svg(parts, title)


def bar_chart(
    title: str, labels: list[str], values: list[float | None], x_label: str, y_label: str
) -> str:
    """One bar per label; a missing value leaves a gap marked n/a."""
    present = [v for v in values if v is not None]
    if not present:
        return _empty(title, "the server exposes no such metric")
    frame = _Frame([0.0, 1.0], present)
    parts = frame.axes(title, x_label, y_label, x_ticks=False)
    slot = (WIDTH - LEFT - RIGHT) / len(labels)
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        x = LEFT + i * slot
        centre = x + slot / 2
        below, above = HEIGHT - BOTTOM + 16, HEIGHT - BOTTOM - 6
        parts.append(f'<text x="{centre:.1f}" y="{below}" text-anchor="middle">{escape(label)}</text>')
        if value is None:
            parts.append(
                f'<text x="{centre:.1f}" y="{above}" text-anchor="middle" class="muted">n/a</text>'
            )
            continue
        top = frame.y(value)
        parts.append(
            f'<rect x="{x + slot * 0.2:.1f}" y="{top:.1f}" width="{slot * 0.6:.1f}" '
            f'height="{HEIGHT - BOTTOM - top:.1f}" fill="{COLORS[0]}"/>'
            f'<text x="{centre:.1f}" y="{top - 4:.1f}" text-anchor="middle">{_fmt(value)}</text>'
        )
    return _svg(parts, title)


@dataclass(frozen=True)
class Dot:
    """One point of a scatter chart; `ok` colours it (within the objective or not)."""

    x: float
    y: float
    label: str
    ok: bool


def scatter_chart(
    title: str,
    dots: list[Dot],
    x_label: str,
    y_label: str,
    frontier: list[Dot],
    chosen: Dot | None = None,
    x_threshold: tuple[float, str] | None = None,
) -> str:
    """Labelled dots, the frontier through `frontier` as a line, `chosen` ringed, and an optional
    dashed vertical threshold (e.g. the p99 objective)."""
    if not dots:
        return _empty(title, "no data")
    xs = [d.x for d in dots]
    drawn = x_threshold is not None and x_threshold[0] <= 2 * max(xs)
    frame = _Frame(xs + ([x_threshold[0]] if drawn else []), [d.y for d in dots])
    parts = frame.axes(title, x_label, y_label)
    if x_threshold is not None and drawn:
        x = frame.x(x_threshold[0])
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" class="threshold"/>'
            f'<text x="{x - 4:.1f}" y="{TOP + 12}" text-anchor="end" class="threshold-label">'
            f"{escape(x_threshold[1])}</text>"
        )
    elif x_threshold is not None:
        parts.append(
            f'<text x="{WIDTH - RIGHT - 4}" y="{TOP + 12}" text-anchor="end" class="threshold-label">'
            f"{escape(x_threshold[1])}: right of this range</text>"
        )
    if len(frontier) > 1:
        path = " ".join(
            f"{frame.x(d.x):.1f},{frame.y(d.y):.1f}" for d in sorted(frontier, key=lambda d: d.x)
        )
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{COLORS[1]}" stroke-width="2" '
            'class="frontier"/>'
        )
    for dot in dots:
        color = COLORS[3] if dot.ok else COLORS[2]
        x, y = frame.x(dot.x), frame.y(dot.y)
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>'
            f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" class="point-label">{escape(dot.label)}</text>'
        )
    if chosen is not None:
        x, y = frame.x(chosen.x), frame.y(chosen.y)
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="none" stroke="#222" stroke-width="2" '
            f'class="chosen"/><text x="{x + 6:.1f}" y="{y + 18:.1f}" class="title">chosen</text>'
        )
    legend = (
        (COLORS[3], "within the objective"),
        (COLORS[2], "over it"),
        (COLORS[1], "Pareto frontier"),
    )
    for index, (color, text) in enumerate(legend):
        legend_y = TOP + 4 + index * 16
        parts.append(
            f'<rect x="{LEFT + 10}" y="{legend_y}" width="12" height="3" fill="{color}"/>'
            f'<text x="{LEFT + 28}" y="{legend_y + 5}">{escape(text)}</text>'
        )
    return _svg(parts, title)
