"""The capacity report on disk: capacity.json (everything), capacity.csv (one row per step) and
report.html (self-contained: inline CSS and SVG, readable offline)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from html import escape
from importlib import metadata
from pathlib import Path

from .capacity import CapacityPlan, Recommendation, Slo, StepRow
from .charts import Series, bar_chart, line_chart


@dataclass(frozen=True)
class CapacityReport:
    """Everything one `convoy capacity` run found, and how it was run."""

    target: dict
    payload: dict
    plan: CapacityPlan
    slo: Slo
    steps: list[StepRow]
    recommendation: Recommendation
    server_metrics_seen: list[str]
    failures: dict[str, int]
    created_at: str = ""

    def to_json(self) -> dict:
        try:
            version = metadata.version("convoy-inference")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return {
            "report": "convoy capacity",
            "convoy_version": version,
            "created_at": self.created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            "target": self.target,
            "payload": self.payload,
            "plan": asdict(self.plan),
            "slo": asdict(self.slo),
            "recommendation": asdict(self.recommendation),
            "steps": [asdict(row) for row in self.steps],
            "server_metrics_seen": self.server_metrics_seen,
            "failures": self.failures,
        }


def write_report(report: CapacityReport, out: Path) -> dict[str, Path]:
    """Write the three files into `out` (created if needed); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    paths = {"json": out / "capacity.json", "csv": out / "capacity.csv", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        names = [f.name for f in fields(StepRow)]
        writer.writerow(names)
        for row in report.steps:
            values = asdict(row)
            values["server_dispatch_reasons"] = ";".join(
                f"{k}={v:g}" for k, v in row.server_dispatch_reasons.items()
            )
            writer.writerow(["" if values[n] is None else values[n] for n in names])
    paths["html"].write_text(render_html(data, report))
    return paths


def _num(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


#: (column title, StepRow field, digits) shown in the HTML table and the CLI table
TABLE_COLUMNS = (
    ("users", "users", 0),
    ("req/s", "throughput_rps", 0),
    ("p50 ms", "p50_ms", 2),
    ("p90 ms", "p90_ms", 2),
    ("p99 ms", "p99_ms", 2),
    ("errors", "error_rate", 4),
    ("rejected", "rejection_rate", 4),
    ("batch", "server_mean_batch_size", 2),
    ("queue µs", "server_mean_queue_us", 0),
    ("client CPU %", "client_cpu_percent", 0),
    ("SLO", "meets_slo", 0),
)

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.muted { color: #777; fill: #777; } .answer { background: #eef6ee; border-left: 4px solid #2ca02c;
  padding: 10px 14px; font-size: 15px; }
.answer.none { background: #fbeeee; border-color: #d62728; }
table { border-collapse: collapse; margin-top: 8px; }
th, td { padding: 4px 10px; text-align: right; border-bottom: 1px solid #ddd; }
th { background: #f4f4f4; } tr.best td { background: #eef6ee; font-weight: 600; }
tr.miss td { color: #a33; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
svg { background: #fff; border: 1px solid #e4e4e4; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg .title { font-size: 13px; font-weight: 600; }
svg .grid { stroke: #eee; } svg .axis { stroke: #888; } svg .threshold { stroke: #d62728;
  stroke-dasharray: 6 4; } svg .threshold-label { fill: #d62728; } svg .point-label { fill: #555; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; } dt { color: #666; }
code { background: #f4f4f4; padding: 1px 4px; }
"""


def _charts(report: CapacityReport) -> list[str]:
    rows = [r for r in report.steps if r.successes]
    labels = [f"{r.users}u" for r in report.steps]
    latency = [
        Series(name, [(r.throughput_rps, getattr(r, attr)) for r in rows], [f"{r.users}u" for r in rows])
        for name, attr in (("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"))
    ]
    return [
        line_chart(
            "Latency vs throughput (labels: users)",
            latency,
            "throughput (successful requests/s)",
            "latency (ms)",
            threshold=(report.slo.p99_ms, f"SLO p99 {report.slo.p99_ms:g} ms"),
        ),
        line_chart(
            "Throughput vs offered load",
            [Series("req/s", [(r.users, r.throughput_rps) for r in report.steps])],
            "concurrent users",
            "requests/s",
        ),
        bar_chart(
            "Mean batch size (server)",
            labels,
            [r.server_mean_batch_size for r in report.steps],
            "step",
            "inferences / executions",
        ),
        bar_chart(
            "Mean queue wait (server)",
            labels,
            [r.server_mean_queue_us for r in report.steps],
            "step",
            "µs per request",
        ),
    ]


def render_html(data: dict, report: CapacityReport) -> str:
    rec = report.recommendation
    target = report.target
    head = "".join(f"<th>{escape(title)}</th>" for title, _, _ in TABLE_COLUMNS)
    body = []
    for row in report.steps:
        css = "best" if row.step == rec.best_step else ("" if row.meets_slo else "miss")
        cells = "".join(
            f"<td>{_num(getattr(row, attr), digits)}</td>" for _, attr, digits in TABLE_COLUMNS
        )
        body.append(f'<tr class="{css}">{cells}</tr>')
    protocol = str(target.get("protocol", ""))
    url = target.get("http_url") if protocol.startswith("http") else target.get("grpc_url")
    model = escape(str(target.get("model")))
    details = {
        "server": f"{protocol} → {url}",
        "model": f"{target.get('model')} (version {target.get('version') or 'latest'})",
        "payload": ", ".join(f"{k}={v}" for k, v in report.payload.items()),
        "steps": f"users {list(report.plan.user_steps)}, {report.plan.duration_s:g} s each after "
        f"{report.plan.warmup_s:g} s warm-up, at most {report.plan.max_requests} requests",
        "SLO": f"p99 ≤ {report.slo.p99_ms:g} ms, failed+rejected ≤ {report.slo.max_error_rate:g}",
        "server metrics": ", ".join(report.server_metrics_seen) or "none exposed (or no --metrics-url)",
        "created": f"{data['created_at']} by convoy {data['convoy_version']}",
    }
    failures = "".join(
        f"<tr><td>{count}</td><td style='text-align:left'>{escape(message)}</td></tr>"
        for message, count in report.failures.items()
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Capacity: {model}</title><style>{_CSS}</style></head><body>"
        f"<h1>Capacity report: {model} over {escape(protocol)}</h1>"
        f"<p class='muted'>{escape(details['created'])}</p>"
        f"<p class='answer{'' if rec.best_step else ' none'}'>{escape(rec.summary)}</p>"
        f"<h2>Steps</h2><table><tr>{head}</tr>{''.join(body)}</table>"
        "<p class='muted'>Latency is measured by the client per successful request; batch size and "
        "queue wait come from the server's Prometheus metrics between the step's start and end; "
        "client CPU near 100% means the load generator, not the server, was the limit.</p>"
        f"<h2>Charts</h2><div class='charts'>{''.join(_charts(report))}</div>"
        "<h2>Run</h2><dl>"
        + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in details.items())
        + "</dl>"
        + (
            f"<h2>Failures</h2><table><tr><th>count</th><th>message</th></tr>{failures}</table>"
            if failures
            else ""
        )
        + "</body></html>\n"
    )
