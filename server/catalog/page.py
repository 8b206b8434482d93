"""The model catalog: `GET /catalog` (an HTML page, self-contained) and `GET /catalog.json` (what
the page shows, and what its script re-reads every few seconds for the live figures).

For every model in the repository: versions and their state (with the reason when not ready),
platform/backend, inputs and outputs, the completed model config, live throughput and latency,
copy-paste client code pointed at this server, and the `convoy capacity` figures when a report
for it was given (--capacity-report). Built on request, on the loop thread, from what the
repository and the statistics already hold: nothing here runs on the inference path.

Live figures: the engine snapshots every version's request-latency histogram once a second from
start (engine/recent.py); requests/s and p50/p99 come from its difference over the last
`window_s` (or since start), as Prometheus' rate() and histogram_quantile() would over the same
buckets. A page view only reads them, so traffic before the first view counts too.

/catalog.json: {"server": {"name", "version", "http", "grpc"}, "window_s", "refresh_ms",
"capacity_errors": [str], "models": [{"name", "state" (READY | UNAVAILABLE), "reason",
"versions": [{"version", "state", "reason", "stats": {"requests", "failures", "p50_ms", "p99_ms",
"window": {"seconds", "requests", "failures", "requests_per_s", "p50_ms", "p99_ms"} | null}}],
"platform", "backend", "max_batch_size", "inputs", "outputs" (name, datatype, shape), "config"
(the ModelConfig API's JSON), "payload_log_sample_rate", "payload_log_on", "example_inputs",
"snippets": {"curl", "python_grpc", "python_http", "python_requests"} | null (not ready),
"capacity": {...} | null, "rollout": {"state", "mode", "step", "candidate_weight", "reason",
"pairs", "agreement", "arms": [{"arm" (stable | candidate), "version", "served": {requests,
errors, error_rate, p50_ms, p90_ms, p99_ms}, "mirrored": {...}}]} | null (a roll-out's two arms
side by side, over the whole roll-out)}]}. Addresses: the HTTP host:port from the request's Host
header (one that is not a plain host[:port] is replaced, so nothing odd reaches the shell
snippets), the gRPC port the server actually bound.
"""

from __future__ import annotations

import json
import logging
import re
from html import escape
from importlib import resources
from pathlib import Path

from convoy import __version__
from convoy.engine.client import DEFAULT_PLATFORM, EngineClient
from convoy.errors import ConvoyError
from convoy.server.catalog.snippets import example_inputs, snippets
from convoy.server.http_api.handlers import proto_to_dict

log = logging.getLogger("convoy.catalog")

#: A Host header we are willing to paste into shell and Python code: a name or an IP, a port.
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(?::(\d{1,5}))?$")
#: How often the page re-reads /catalog.json (milliseconds).
REFRESH_MS = 5000


class Catalog:
    """Builds the catalog document and page; keeps the recent histogram snapshots."""

    def __init__(
        self,
        engine: EngineClient,
        grpc_port: int,
        capacity_reports: tuple[Path, ...] = (),
        window_s: float = 60.0,
        keys_required: bool = False,
    ) -> None:
        """`keys_required`: the server wants API keys; the snippets then send one from the
        CONVOY_API_KEY environment variable."""
        self.engine = engine
        self.keys_required = keys_required
        self.grpc_port = grpc_port
        self.capacity_reports = capacity_reports
        self.window_s = window_s
        self._reports: dict[Path, tuple[float, dict | None, str]] = {}
        files = resources.files("convoy.server.catalog")
        self._template = files.joinpath("catalog.html").read_text()
        #: With API keys, what a browser without one gets: a form that asks for the key, keeps
        #: it in the tab's sessionStorage and opens the catalog with it.
        self.key_prompt = files.joinpath("key_prompt.html").read_text()

    # --- the document ------------------------------------------------------------------------------
    async def document(self, host_header: str, server_port: int, allows=None) -> dict:
        """What /catalog.json answers (and /catalog renders). `host_header` is the request's
        Host; one that is not a plain host[:port] is replaced by localhost and `server_port`.
        `allows(name)`: only the models the caller's API key may use are listed."""
        host, http_port = _host_and_port(host_header, server_port)
        http_base = f"http://{host}:{http_port}"
        grpc_address = f"{host}:{self.grpc_port}"
        capacity, capacity_errors = self._capacity()
        rows: dict[str, list[dict]] = {}
        for row in await self.engine.repository_index():
            if allows is None or allows(row["name"]):
                rows.setdefault(row["name"], []).append(row)
        figures = await self.engine.catalog_figures()
        models = [
            self._model(name, index_rows, http_base, grpc_address, capacity.get(name), figures)
            for name, index_rows in rows.items()
        ]
        return {
            "server": {
                "name": "convoy",
                "version": __version__,
                "http": http_base,
                "grpc": grpc_address,
            },
            "window_s": figures.get("window_s", self.window_s),
            "refresh_ms": REFRESH_MS,
            "capacity_errors": capacity_errors,
            "models": models,
        }

    def _model(
        self, name: str, index_rows: list[dict], http_base: str, grpc: str, capacity, figures: dict
    ) -> dict:
        engine = self.engine
        model = engine.models().get(name)
        versions = []
        for row in index_rows:
            version = {"version": row["version"], "state": row["state"], "reason": row["reason"]}
            live = figures["versions"].get(f"{name}/{row['version']}") if row["version"] else None
            if live is not None:
                version["stats"] = live  # totals and the recent window, from the engine
            versions.append(version)
        ready = any(v["state"] == "READY" for v in versions)
        out = {
            "name": name,
            "state": "READY" if ready else "UNAVAILABLE",
            "reason": "" if ready else "; ".join(sorted({v["reason"] for v in versions if v["reason"]})),
            "versions": versions,
            "platform": "",
            "backend": "",
            "max_batch_size": None,
            "inputs": [],
            "outputs": [],
            "config": None,
            "payload_log_sample_rate": None,
            #: Whether the server writes payload logs at all (--payload-log-dir).
            "payload_log_on": figures["payload_log_on"],
            "snippets": None,
            "capacity": capacity,
            "rollout": _rollout_summary(figures.get("rollouts", {}).get(name)),
        }
        config = model.config if model is not None else None
        if config is None:
            return out
        out["backend"] = config.backend
        out["platform"] = config.platform or DEFAULT_PLATFORM.get(config.backend, config.backend)
        out["max_batch_size"] = config.max_batch_size
        out["payload_log_sample_rate"] = config.payload_log_sample_rate
        if model.config_proto is not None:
            out["config"] = proto_to_dict(model.config_proto)
        try:
            metadata = engine.model_metadata(name)
        except ConvoyError:
            return out
        out["inputs"], out["outputs"] = metadata["inputs"], metadata["outputs"]
        if ready:
            out["example_inputs"] = [
                {"name": e.name, "datatype": e.datatype, "shape": e.shape, "data": e.values}
                for e in example_inputs(metadata)
            ]
            out["snippets"] = snippets(metadata, http_base, grpc, self.keys_required)
        return out

    # --- capacity reports ------------------------------------------------------------------------
    def _capacity(self) -> tuple[dict[str, dict], list[str]]:
        """{model: capacity figures} from the --capacity-report files (re-read when they change),
        and a message per report that exists but cannot be used."""
        found: dict[str, dict] = {}
        errors = []
        for given in self.capacity_reports:
            path = given / "capacity.json" if given.is_dir() else given
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue  # not written yet: nothing to show
            cached = self._reports.get(path)
            if cached is None or cached[0] != mtime:
                cached = (mtime, *_read_report(path))
                self._reports[path] = cached
            _, figures, error = cached
            if error:
                errors.append(error)
            elif figures is not None:
                found[figures["model"]] = figures
        return found, errors

    # --- the page ------------------------------------------------------------------------------
    def page(self, document: dict) -> str:
        """The HTML page: the template's CSS and script around the rendered models."""
        body = "\n".join(_render_model(m) for m in document["models"]) or "<p>No models.</p>"
        errors = "".join(f'<p class="error">{escape(e)}</p>' for e in document["capacity_errors"])
        server = document["server"]
        header = (
            f"<p>Convoy {escape(server['version'])} &middot; HTTP <code>{escape(server['http'])}</code>"
            f" &middot; gRPC <code>{escape(server['grpc'])}</code> &middot; live figures over the last "
            f"{document['window_s']:g} s, refreshed every {document['refresh_ms'] // 1000} s</p>"
        )
        # Placeholders in this order: what is filled in (user data) is never searched again.
        return (
            self._template.replace("REFRESH_MS", str(document["refresh_ms"]))
            .replace("<!--HEADER-->", header + errors)
            .replace("<!--MODELS-->", body)
        )


def _rollout_summary(status: dict | None) -> dict | None:
    """What the catalog shows of a model's roll-out: both arms side by side."""
    if status is None:
        return None
    totals = status["totals"]
    decision = status.get("decision") or {}
    return {
        "state": status["state"],
        "mode": status["mode"],
        "step": status["step"]["label"],
        "candidate_weight": status["candidate_weight"],
        "reason": decision.get("reason") or status.get("reason") or "",
        "pairs": totals["pairs"]["pairs"],
        "agreement": totals["pairs"]["agreement"],
        "arms": [
            {
                "arm": arm,
                "version": status[arm],
                "served": totals[arm]["served"],
                "mirrored": totals[arm]["mirrored"],
            }
            for arm in ("stable", "candidate")
        ],
    }


def _host_and_port(host_header: str, server_port: int) -> tuple[str, int]:
    found = _HOST.match(host_header or "")
    if found is None:
        return "localhost", server_port
    port = int(found.group(1)) if found.group(1) else 80
    host = host_header.rsplit(":", 1)[0] if found.group(1) else host_header
    if not 0 < port < 65536:
        return "localhost", server_port
    return host, port


def _read_report(path: Path) -> tuple[dict | None, str]:
    """(figures, "") from a capacity.json, or (None, message) when it is not one."""
    try:
        data = json.loads(path.read_text())
        rec = data["recommendation"]
        best = None
        for step in data["steps"]:
            if step["step"] == rec["best_step"]:
                best = step
        return {
            "model": str(data["target"]["model"]),
            "report": str(path),
            "created_at": data.get("created_at", ""),
            "protocol": data["target"].get("protocol", ""),
            "slo_p99_ms": data["slo"]["p99_ms"],
            "per_replica_rps": rec["per_replica_rps"],
            "headroom": rec["headroom"],
            "usable_rps": rec["usable_rps"],
            "target_rps": rec["target_rps"],
            "replicas": rec["replicas"],
            "summary": rec["summary"],
            "best_step": None
            if best is None
            else {k: best[k] for k in ("users", "throughput_rps", "p50_ms", "p99_ms")},
        }, ""
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"capacity report {path} is not a readable `convoy capacity` report: {exc!r}"


# --- rendering (every value from the repository is escaped) -------------------------------------
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return escape(f"{value:,.{digits}f}")
    return escape(str(value))


def _tensor_rows(tensors: list[dict]) -> str:
    if not tensors:
        return '<tr><td colspan="3">&ndash;</td></tr>'
    return "".join(
        f"<tr><td><code>{escape(t['name'])}</code></td><td>{escape(t['datatype'])}</td>"
        f"<td><code>{escape(json.dumps(t['shape']))}</code></td></tr>"
        for t in tensors
    )


def _live_cells(stats: dict | None) -> str:
    window = (stats or {}).get("window") or {}
    cells = (
        ("requests_per_s", window.get("requests_per_s"), 1),
        ("p50_ms", window.get("p50_ms"), 2),
        ("p99_ms", window.get("p99_ms"), 2),
        ("requests", (stats or {}).get("requests"), 0),
        ("failures", (stats or {}).get("failures"), 0),
    )
    return "".join(f'<td data-field="{name}">{_fmt(value, d)}</td>' for name, value, d in cells)


def _payload_note(model: dict) -> str:
    rate = model["payload_log_sample_rate"]
    if not rate:
        return ""
    note = f" &middot; payload log sample rate {_fmt(rate, 2)}"
    if not model["payload_log_on"]:
        note += " (not written: the server runs without --payload-log-dir)"
    return note


def _render_model(model: dict) -> str:
    name = escape(model["name"])
    state = escape(model["state"])
    reason = f'<p class="reason">{escape(model["reason"])}</p>' if model["reason"] else ""
    versions = "".join(
        f'<tr data-model="{name}" data-version="{escape(v["version"])}">'
        f"<td>{escape(v['version'] or '-')}</td>"
        f'<td class="state {escape(v["state"])}">{escape(v["state"])}</td>'
        f"<td>{escape(v['reason'])}</td>{_live_cells(v.get('stats'))}</tr>"
        for v in model["versions"]
    )
    parts = [
        f'<section class="model" id="model-{name}" data-model="{name}">',
        f'<h2><span class="name">{name}</span> <span class="state {state}">{state}</span></h2>',
        reason,
        f"<p>platform <code>{escape(model['platform'] or '-')}</code> &middot; backend "
        f"<code>{escape(model['backend'] or '-')}</code> &middot; max_batch_size "
        f"{_fmt(model['max_batch_size'])}" + _payload_note(model) + "</p>",
        '<table class="versions"><thead><tr><th>version</th><th>state</th><th>reason</th>'
        "<th>req/s</th><th>p50 ms</th><th>p99 ms</th><th>requests</th><th>failures</th></tr></thead>"
        f"<tbody>{versions}</tbody></table>",
        '<div class="io"><table class="inputs"><caption>inputs</caption>'
        f"<tr><th>name</th><th>datatype</th><th>shape</th></tr>{_tensor_rows(model['inputs'])}</table>"
        '<table class="outputs"><caption>outputs</caption>'
        f"<tr><th>name</th><th>datatype</th><th>shape</th></tr>{_tensor_rows(model['outputs'])}</table>"
        "</div>",
    ]
    if model.get("rollout"):
        parts.append(_render_rollout(name, model["rollout"]))
    capacity = model.get("capacity")
    if capacity:
        parts.append(_render_capacity(capacity))
    if model["snippets"]:
        parts.append('<div class="snippets">')
        for key, title in (
            ("curl", "curl (HTTP JSON)"),
            ("python_grpc", "Python, tritonclient gRPC"),
            ("python_http", "Python, tritonclient HTTP"),
            ("python_requests", "Python, requests"),
        ):
            parts.append(
                f'<details class="snippet"{" open" if key == "curl" else ""}><summary>{title} '
                '<button type="button" class="copy">copy</button></summary>'
                f'<pre><code data-snippet="{key}" data-model="{name}">'
                f"{escape(model['snippets'][key])}</code></pre></details>"
            )
        parts.append("</div>")
    if model["config"] is not None:
        parts.append(
            '<details class="config"><summary>model config (JSON)</summary>'
            f"<pre>{escape(json.dumps(model['config'], indent=2))}</pre></details>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _render_rollout(name: str, rollout: dict) -> str:
    """The roll-out's arms side by side; cells carry data-rollout-* so the page's script
    refreshes them."""
    arms = rollout["arms"]
    header = "".join(f"<th>{escape(a['arm'])} (version {_fmt(a['version'])})</th>" for a in arms)
    rows = []
    for kind in ("served", "mirrored"):
        for field, label, digits in (
            ("requests", "requests", 0),
            ("error_rate", "error rate", 4),
            ("p50_ms", "p50 ms", 2),
            ("p99_ms", "p99 ms", 2),
        ):
            cells = "".join(
                f'<td data-rollout-arm="{escape(a["arm"])}" data-rollout-kind="{kind}" '
                f'data-rollout-field="{field}">{_fmt(a[kind][field], digits)}</td>'
                for a in arms
            )
            rows.append(f"<tr><th>{kind} {label}</th>{cells}</tr>")
    return (
        f'<div class="rollout" data-model="{name}"><h3>roll-out: '
        f'<span data-rollout="state">{escape(rollout["state"])}</span> &middot; '
        f'{escape(rollout["mode"])} &middot; step <span data-rollout="step">'
        f"{escape(rollout['step'])}</span> &middot; candidate weight "
        f'<span data-rollout="candidate_weight">{_fmt(rollout["candidate_weight"] * 100, 0)}</span>%'
        f' &middot; agreement <span data-rollout="agreement">{_fmt(rollout["agreement"], 4)}</span>'
        f' over <span data-rollout="pairs">{_fmt(rollout["pairs"])}</span> pairs</h3>'
        f'<p data-rollout="reason">{escape(rollout["reason"])}</p>'
        f"<table><tr><th></th>{header}</tr>{''.join(rows)}</table></div>"
    )


def _render_capacity(capacity: dict) -> str:
    best = capacity.get("best_step") or {}
    rows = (
        ("per replica (req/s, within the SLO)", _fmt(capacity["per_replica_rps"], 0)),
        ("SLO p99 (ms)", _fmt(capacity["slo_p99_ms"], 1)),
        (
            "at step: users / p50 ms / p99 ms",
            " / ".join(_fmt(best.get(k), 2) for k in ("users", "p50_ms", "p99_ms")),
        ),
        ("headroom", _fmt(capacity["headroom"], 2)),
        ("usable per replica (req/s)", _fmt(capacity["usable_rps"], 0)),
        (
            "target (req/s) &rarr; replicas",
            f"{_fmt(capacity['target_rps'], 0)} &rarr; {_fmt(capacity['replicas'])}",
        ),
    )
    cells = "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    return (
        f'<div class="capacity"><h3>capacity ({escape(capacity["protocol"])}, '
        f"{escape(capacity['created_at'])})</h3><table>{cells}</table>"
        f"<p>{escape(capacity['summary'])}</p></div>"
    )
