"""`convoy rollout report`: everything a roll-out measured as JSON, and the same as one
self-contained HTML page (inline SVG, no script, no network): both arms' latency distributions,
agreement over time, and the gate's decisions on a timeline.

The JSON: {"model", "generated_at", "status" (what `rollout status` answers), "spec",
"latency": {"bounds_ms": [...], "arms": {"stable_served" | "candidate_served" |
"stable_mirrored" | "candidate_mirrored": {"counts": [...], "count", "sum_ms"}}},
"agreement_timeline": [{"t_s", "width_s", "pairs", "agreement"}], "steps": [each finished step's
label, decision and measurements], "history": [every transition]}.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .controller import Rollout

ARMS = ("stable_served", "candidate_served", "stable_mirrored", "candidate_mirrored")
COLOURS = {
    "stable_served": "#1f77b4",
    "candidate_served": "#d62728",
    "stable_mirrored": "#7fb2dc",
    "candidate_mirrored": "#ff9896",
}
ACTION_COLOURS = {
    "start": "#555555",
    "advance": "#2ca02c",
    "ready": "#2ca02c",
    "promote": "#17becf",
    "rollback": "#d62728",
    "aborted": "#ff7f0e",
    "revert": "#ff7f0e",
    "resume": "#9467bd",
    "release": "#8c564b",
}


def report_document(rollout: Rollout) -> dict[str, Any]:
    histograms = rollout.histograms
    # Every arm counts into the same latency buckets (batching/stats.py's LATENCY_BOUNDS_NS).
    bounds = histograms.stable_served.bounds
    arms = {}
    for arm in ARMS:
        histogram = getattr(histograms, arm)
        counts = list(histogram.buckets)
        arms[arm] = {"counts": counts, "count": sum(counts), "sum_ms": histogram.total / 1e6}
    return {
        "model": rollout.model,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "status": rollout.status(),
        "spec": rollout.spec.describe(),
        "latency": {"bounds_ms": [b / 1e6 for b in bounds], "arms": arms},
        "agreement_timeline": rollout.timeline.describe(),
        "steps": list(rollout.step_results),
        "history": list(rollout.history),
    }


# --- HTML ---------------------------------------------------------------------------------------------
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.state{font-weight:bold;padding:.1em .5em;border-radius:.3em;color:#fff}
.running,.ready{background:#1f77b4}.promoted{background:#2ca02c}.rolled_back{background:#d62728}
.aborted,.reverted{background:#ff7f0e}
svg{background:#fff;border:1px solid #ddd}svg text{font-size:11px;fill:#333}
.legend span{display:inline-block;margin-right:1.2em}
.legend i{display:inline-block;width:1em;height:.6em;margin-right:.3em}
"""


def _fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return escape(f"{value:,.{digits}f}")
    return escape(str(value))


def render_html(document: dict[str, Any]) -> str:
    status = document["status"]
    model = escape(document["model"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Roll-out of {model}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Roll-out of <code>{model}</code>: version {status['stable']} &rarr; "
        f'{status["candidate"]} <span class="state {escape(status["state"])}" id="state">'
        f"{escape(status['state'])}</span></h1>",
        f"<p>mode <b>{escape(status['mode'])}</b> &middot; started {escape(status['started_at'])}"
        + (f" &middot; finished {escape(status['finished_at'])}" if status.get("finished_at") else "")
        + f" &middot; report generated {escape(document['generated_at'])}</p>",
    ]
    if status.get("reason"):
        parts.append(f'<p id="reason"><b>Why:</b> {escape(status["reason"])}</p>')
    parts.append(_summary_table(status))
    parts.append("<h2>Latency distributions (whole roll-out)</h2>")
    parts.append(_latency_chart(document["latency"]))
    parts.append("<h2>Agreement over time</h2>")
    parts.append(_agreement_chart(document["agreement_timeline"]))
    parts.append("<h2>Guard decisions</h2>")
    parts.append(_decision_timeline(document["history"]))
    parts.append(_history_table(document["history"]))
    parts.append(_outputs_table(status["totals"]["pairs"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_table(status: dict[str, Any]) -> str:
    totals = status["totals"]
    rows = []
    for arm in ("stable", "candidate"):
        for kind in ("served", "mirrored"):
            window = totals[arm][kind]
            rows.append(
                f'<tr><td class="l">{arm} ({"version " + str(status[arm])}) {kind}</td>'
                f"<td>{_fmt(window['requests'])}</td><td>{_fmt(window['errors'])}</td>"
                f"<td>{_fmt(window['error_rate'], 4)}</td><td>{_fmt(window['p50_ms'])}</td>"
                f"<td>{_fmt(window['p90_ms'])}</td><td>{_fmt(window['p99_ms'])}</td></tr>"
            )
    pairs = totals["pairs"]
    mirrors = totals["mirrors"]
    return (
        '<table id="arms"><tr><th class="l">arm</th><th>requests</th><th>errors</th>'
        "<th>error rate</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th></tr>"
        + "".join(rows)
        + "</table>"
        f"<p>pairs compared {_fmt(pairs['pairs'])}, agreeing {_fmt(pairs['agreeing'])} "
        f"(agreement {_fmt(pairs['agreement'], 4)}) &middot; mirrors sent {_fmt(mirrors['sent'])}, "
        f"dropped by budget {_fmt(mirrors['dropped_budget'])}, "
        f"by queue {_fmt(mirrors['dropped_queue'])}, "
        f"failed {_fmt(mirrors['failed'])}</p>"
    )


def _legend(items: list[tuple[str, str]]) -> str:
    return (
        '<p class="legend">'
        + "".join(
            f'<span><i style="background:{colour}"></i>{escape(label)}</span>' for label, colour in items
        )
        + "</p>"
    )


def _latency_chart(latency: dict[str, Any]) -> str:
    """Cumulative distribution per arm over the latency buckets (log-spaced x axis)."""
    bounds = latency["bounds_ms"]
    width, height, left, bottom, top = 760, 280, 50, 40, 15
    plot_w, plot_h = width - left - 20, height - bottom - top
    slots = len(bounds) + 1

    def x(index: float) -> float:
        return left + plot_w * index / (slots - 1)

    def y(share: float) -> float:
        return top + plot_h * (1 - share)

    lines = []
    legend = []
    for arm in ARMS:
        counts = latency["arms"][arm]["counts"]
        total = sum(counts)
        if not total:
            continue
        running = 0
        points = [f"{x(0):.1f},{y(0):.1f}"]
        for index, count in enumerate(counts):
            running += count
            points.append(f"{x(index):.1f},{y(running / total):.1f}")
        colour = COLOURS[arm]
        lines.append(
            f'<polyline data-arm="{arm}" fill="none" stroke="{colour}" stroke-width="2" '
            f'points="{" ".join(points)}"/>'
        )
        legend.append((f"{arm.replace('_', ' ')} ({total:,})", colour))
    ticks = []
    for index, bound in enumerate(bounds):
        if index % 2 == 0:
            ticks.append(
                f'<text x="{x(index):.1f}" y="{height - bottom + 15}" '
                f'text-anchor="middle">{bound:g}</text>'
            )
    for share in (0, 0.25, 0.5, 0.75, 1.0):
        ticks.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(share):.1f}" '
            f'y2="{y(share):.1f}" stroke="#eee"/>'
            f'<text x="{left - 5}" y="{y(share) + 4:.1f}" text-anchor="end">{share:g}</text>'
        )
    empty = (
        ""
        if lines
        else f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no requests yet</text>'
    )
    return (
        f'<svg id="latency" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="latency distribution per arm">'
        + "".join(ticks)
        + "".join(lines)
        + empty
        + f'<text x="{left + plot_w / 2}" y="{height - 5}" text-anchor="middle">'
        "latency (ms, bucket upper bound)</text>"
        "</svg>" + _legend(legend)
    )


def _agreement_chart(timeline: list[dict[str, Any]]) -> str:
    width, height, left, bottom, top = 760, 220, 50, 35, 15
    plot_w, plot_h = width - left - 20, height - bottom - top
    points = [p for p in timeline if p["agreement"] is not None]
    span = max((p["t_s"] + p["width_s"] for p in timeline), default=1.0) or 1.0
    low = min((p["agreement"] for p in points), default=0.0)
    floor = 0.0 if low < 0.9 else 0.9

    def x(t: float) -> float:
        return left + plot_w * t / span

    def y(value: float) -> float:
        return top + plot_h * (1 - (value - floor) / (1 - floor))

    path = " ".join(f"{x(p['t_s'] + p['width_s'] / 2):.1f},{y(p['agreement']):.1f}" for p in points)
    marks = "".join(
        f'<circle data-t="{p["t_s"]:g}" data-pairs="{p["pairs"]}" '
        f'cx="{x(p["t_s"] + p["width_s"] / 2):.1f}" '
        f'cy="{y(p["agreement"]):.1f}" r="2.5" fill="#2ca02c"><title>{p["pairs"]} pairs, agreement '
        f"{p['agreement']:.4f}</title></circle>"
        for p in points
    )
    grid = "".join(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>'
        f'<text x="{left - 5}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>'
        for v in ((0, 0.5, 1.0) if floor == 0 else (0.9, 0.95, 0.99, 1.0))
    )
    line = (
        f'<polyline fill="none" stroke="#2ca02c" stroke-width="1.5" points="{path}"/>' if points else ""
    )
    empty = (
        ""
        if points
        else f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no pairs compared</text>'
    )
    return (
        f'<svg id="agreement" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        'aria-label="agreement over time">'
        + grid
        + line
        + marks
        + empty
        + f'<text x="{left + plot_w / 2}" y="{height - 5}" text-anchor="middle">'
        "seconds since the roll-out began</text>"
        "</svg>"
    )


def _decision_timeline(history: list[dict[str, Any]]) -> str:
    width, height, left = 760, 120, 70
    plot_w = width - 2 * left
    span = max((h["t_s"] for h in history), default=1.0) or 1.0

    def x(t: float) -> float:
        return left + plot_w * t / span

    marks = []
    for index, entry in enumerate(history):
        colour = ACTION_COLOURS.get(entry["action"], "#333")
        cx = x(entry["t_s"])
        label_y = 40 if index % 2 == 0 else 95
        marks.append(
            f'<g class="decision" data-action="{escape(entry["action"])}">'
            f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="55" y2="75" stroke="{colour}" stroke-width="2"/>'
            f'<circle cx="{cx:.1f}" cy="65" r="5" fill="{colour}"><title>{escape(entry["time"])} '
            f"{escape(entry['action'])}: {escape(entry['reason'])}</title></circle>"
            f'<text x="{cx:.1f}" y="{label_y}" text-anchor="middle">{escape(entry["action"])} '
            f"({escape(entry['label'])})</text></g>"
        )
    axis = f'<line x1="{left}" x2="{left + plot_w}" y1="65" y2="65" stroke="#999"/>'
    end = f'<text x="{left + plot_w}" y="115" text-anchor="end">{span:.1f} s</text>'
    return (
        f'<svg id="decisions" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        'aria-label="guard decisions on a timeline">' + axis + "".join(marks) + end + "</svg>"
    )


def _history_table(history: list[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr><td class="l">{escape(h["time"])}</td><td>{h["t_s"]:.1f}</td><td class="l">'
        f'{escape(h["label"])}</td><td class="l">{escape(h["action"])}</td><td class="l">'
        f"{escape(h['reason'])}</td></tr>"
        for h in history
    )
    return (
        '<table id="history"><tr><th class="l">time</th><th>t (s)</th><th class="l">step</th>'
        '<th class="l">action</th><th class="l">reason</th></tr>' + rows + "</table>"
    )


def _outputs_table(pairs: dict[str, Any]) -> str:
    outputs = pairs.get("outputs") or {}
    if not outputs:
        return ""
    rows = "".join(
        f'<tr><td class="l"><code>{escape(name)}</code></td><td>{_fmt(o["pairs"])}</td>'
        f"<td>{_fmt(o['agreement'], 4)}</td><td>{_fmt(o['max_abs_error'], 6)}</td>"
        f"<td>{_fmt(o['max_rel_error'], 6)}</td><td>{_fmt(o['min_cosine'], 6)}</td>"
        f"<td>{_fmt(o.get('top1_agreement'), 4)}</td><td>{_fmt(o.get('topk_agreement'), 4)}</td></tr>"
        for name, o in outputs.items()
    )
    return (
        "<h2>Per output (whole roll-out)</h2>"
        '<table id="outputs"><tr><th class="l">output</th><th>pairs</th><th>agreement</th>'
        "<th>max abs error</th><th>max rel error</th><th>min cosine</th><th>top-1</th>"
        "<th>top-k</th></tr>" + rows + "</table>"
    )
