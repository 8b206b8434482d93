"""The `convoy tune` report on disk: tune.json (every candidate and every ramp level) and
tune.html (self-contained: the throughput/p99 frontier, the chosen candidate marked, and a table
saying why each candidate was or was not chosen)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from html import escape
from importlib import metadata
from pathlib import Path

from .capacity import Slo
from .charts import Dot, bar_chart, scatter_chart
from .report import _CSS, _num
from .tune import Candidate, Choice, Trial, TunePlan


@dataclass(frozen=True)
class TuneReport:
    """Everything one `convoy tune` run tried and found, and how it was run."""

    target: dict
    plan: TunePlan
    slo: Slo
    baseline: Candidate
    trials: list[Trial]
    choice: Choice
    elapsed_s: float
    #: What became of the server's model: "restored", "applied", or a sentence on what failed.
    server_state: str
    #: The config.pbtxt written (None: none met the objective).
    config_text: str | None
    created_at: str = ""

    def to_json(self) -> dict:
        try:
            version = metadata.version("convoy-inference")
        except metadata.PackageNotFoundError:
            version = "unknown"
        best = self.choice.best
        return {
            "report": "convoy tune",
            "convoy_version": version,
            "created_at": self.created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            "target": self.target,
            "plan": asdict(self.plan),
            "slo": asdict(self.slo),
            "baseline": asdict(self.baseline),
            "elapsed_s": self.elapsed_s,
            "best": best.index if best is not None else None,
            "closest": self.choice.closest.index if self.choice.closest is not None else None,
            "frontier": list(self.choice.frontier),
            "summary": self.choice.summary,
            "server_state": self.server_state,
            "candidates": [_trial_json(t, self.choice) for t in self.trials],
        }


def _trial_json(trial: Trial, choice: Choice) -> dict:
    point = trial.point
    return {
        "index": trial.index,
        "phase": trial.phase,
        "config": asdict(trial.candidate),
        "label": trial.candidate.label,
        "error": trial.error,
        "meets_slo": trial.meets_slo,
        "users": point.users if point is not None else None,
        "throughput_rps": trial.throughput_rps,
        "p50_ms": point.p50_ms if point is not None else None,
        "p99_ms": trial.p99_ms,
        "server_mean_batch_size": point.server_mean_batch_size if point is not None else None,
        "client_bound": trial.client_bound,
        "on_frontier": trial.index in choice.frontier,
        "reason": choice.reasons.get(trial.index, ""),
        "elapsed_s": trial.elapsed_s,
        "levels": [asdict(row) for row in trial.levels],
    }


def write_report(report: TuneReport, out: Path) -> dict[str, Path]:
    """tune.json, tune.html and (when a candidate met the objective) config.pbtxt into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    paths = {"json": out / "tune.json", "html": out / "tune.html"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["html"].write_text(render_html(data, report))
    if report.config_text is not None:
        paths["config"] = out / "config.pbtxt"
        paths["config"].write_text(report.config_text)
    return paths


def _dot(trial: Trial) -> Dot:
    return Dot(trial.p99_ms or 0.0, trial.throughput_rps, f"#{trial.index}", trial.meets_slo)


def _charts(report: TuneReport) -> list[str]:
    measured = [t for t in report.trials if t.error is None and t.p99_ms is not None]
    by_index = {t.index: t for t in measured}
    chosen = report.choice.best
    return [
        scatter_chart(
            "Throughput against p99, one dot per candidate",
            [_dot(t) for t in measured],
            "p99 latency (ms) at the candidate's chosen load",
            "throughput (successful requests/s)",
            [_dot(by_index[i]) for i in report.choice.frontier if i in by_index],
            _dot(chosen) if chosen is not None else None,
            (report.slo.p99_ms, f"objective p99 {report.slo.p99_ms:g} ms"),
        ),
        bar_chart(
            "Throughput per candidate",
            [f"#{t.index}" for t in report.trials],
            [t.throughput_rps if t.error is None else None for t in report.trials],
            "candidate",
            "requests/s within the objective (or at its lowest p99)",
        ),
    ]


#: The capacity report's style, and the written config shown as it is in the file.
_STYLE = _CSS + "pre { background: #f7f7f7; padding: 10px 14px; overflow-x: auto; }\n"


def _row(trial: Trial, choice: Choice) -> list[str]:
    c, point = trial.candidate, trial.point
    return [
        f"#{trial.index}",
        trial.phase,
        str(c.max_batch_size),
        str(c.instance_count),
        f"{c.max_queue_delay_us}" if c.dynamic_batching else "off",
        ", ".join(map(str, c.preferred_batch_sizes)) or "-",
        _num(point.users if point else None),
        _num(trial.throughput_rps if point else None, 0),
        _num(point.p50_ms if point else None),
        _num(trial.p99_ms),
        _num(point.server_mean_batch_size if point else None),
        _num(point.client_cpu_percent if point else None, 0),
        "yes" if trial.meets_slo else "no",
    ]


_HEAD = (
    "#",
    "phase",
    "max_batch_size",
    "instances",
    "queue delay µs",
    "preferred",
    "users",
    "req/s",
    "p50 ms",
    "p99 ms",
    "batch",
    "client CPU %",
    "SLO",
)


def render_html(data: dict, report: TuneReport) -> str:
    choice = report.choice
    model = escape(str(report.target.get("model")))
    rows = []
    for trial in report.trials:
        css = "best" if choice.best is not None and trial.index == choice.best.index else ""
        if not css:
            css = "miss" if not trial.meets_slo else ""
        cells = "".join(f"<td>{escape(v)}</td>" for v in _row(trial, choice))
        why = escape(choice.reasons.get(trial.index, ""))
        rows.append(f'<tr class="{css}">{cells}<td style="text-align:left">{why}</td></tr>')
    head = "".join(f"<th>{escape(h)}</th>" for h in (*_HEAD, "why"))
    levels = []
    for trial in report.trials:
        for row in trial.levels:
            levels.append(
                f"<tr><td>#{trial.index}</td><td>{row.users}</td><td>{_num(row.throughput_rps, 0)}</td>"
                f"<td>{_num(row.p50_ms)}</td><td>{_num(row.p99_ms)}</td>"
                f"<td>{_num(row.error_rate + row.rejection_rate, 4)}</td>"
                f"<td>{_num(row.client_cpu_percent, 0)}</td><td>{_num(row.meets_slo)}</td></tr>"
            )
    plan = report.plan
    details = {
        "server": f"{plan.protocol} → {report.target.get('url')}",
        "model": f"{report.target.get('model')} (version {report.target.get('version') or 'latest'})",
        "baseline": report.baseline.label,
        "objective": f"p99 ≤ {report.slo.p99_ms:g} ms, failed+rejected ≤ {report.slo.max_error_rate:g}",
        "budget": f"{plan.budget_s:g} s; used {report.elapsed_s:.0f} s for {len(report.trials)} "
        f"candidates; each ramp level {plan.level_duration_s:g} s after {plan.level_warmup_s:g} s "
        f"warm-up, at most {plan.max_users} users",
        "server afterwards": report.server_state,
        "created": f"{data['created_at']} by convoy {data['convoy_version']}",
    }
    config = (
        f"<h2>config.pbtxt written</h2><pre>{escape(report.config_text)}</pre>"
        if report.config_text is not None
        else "<h2>config.pbtxt</h2><p>None written: no candidate met the objective.</p>"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Tune: {model}</title><style>{_STYLE}</style></head><body>"
        f"<h1>Tune report: {model}</h1>"
        f"<p class='muted'>{escape(details['created'])}</p>"
        f"<p class='answer{'' if choice.best else ' none'}'>{escape(choice.summary)}</p>"
        f"<h2>Frontier</h2><div class='charts'>{''.join(_charts(report))}</div>"
        "<p class='muted'>Each candidate's dot is the load level (concurrent users) of its ramp with "
        "the highest throughput within the objective, or its lowest p99 when none met it. The "
        "frontier joins the candidates no other beats on both throughput and p99.</p>"
        f"<h2>Candidates</h2><table><tr>{head}</tr>{''.join(rows)}</table>"
        "<p class='muted'>batch: the server's mean batch size (inferences / executions) at that "
        "level; client CPU near 100% means the load generator, not the server, was the limit.</p>"
        + config
        + "<h2>Ramps</h2><table><tr><th>candidate</th><th>users</th><th>req/s</th><th>p50 ms</th>"
        "<th>p99 ms</th><th>failed</th><th>client CPU %</th><th>SLO</th></tr>"
        + "".join(levels)
        + "</table><h2>Run</h2><dl>"
        + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in details.items())
        + "</dl></body></html>\n"
    )
