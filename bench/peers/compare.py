"""Convoy against a peer: pair runs by (protocol, concurrency), ratios, targets, Markdown.

Pure functions over the benchmark's JSON records (dicts as written to the report), so the
report logic is tested without starting anything.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_LABELS = {"grpc": "gRPC", "http": "HTTP binary", "http_json": "HTTP JSON"}
DRIVER_LABELS = {
    "perf_analyzer": "perf_analyzer",
    "loadgen": "bench/loadgen.py (perf_analyzer cannot drive it: no ModelConfig RPC/route)",
}


#: What the pair keeps of each side's measurement.
SIDE_FIELDS = ("requests_per_s", "p50_us", "p99_us", "unstable", "error")


def _key(run: dict) -> tuple[str, int]:
    return run["protocol"], run["concurrency"]


def pair(convoy_runs: list[dict], peer_runs: list[dict]) -> list[dict]:
    """One row per peer run: both sides' numbers and Convoy/peer ratios (None where either
    side failed or is missing). Throughput ratio > 1 and p50 ratio > 1 both favour Convoy."""
    convoy_by_key = {_key(run): run for run in convoy_runs}
    rows = []
    for peer in peer_runs:
        convoy = convoy_by_key.get(_key(peer), {"error": "not measured"})
        row = {
            "protocol": peer["protocol"],
            "concurrency": peer["concurrency"],
            "convoy": {k: convoy.get(k) for k in SIDE_FIELDS},
            "peer": {k: peer.get(k) for k in SIDE_FIELDS},
            "convoy_over_peer": None,
            "peer_p50_over_convoy": None,
        }
        if "error" not in convoy and "error" not in peer:
            if peer["requests_per_s"]:
                row["convoy_over_peer"] = round(convoy["requests_per_s"] / peer["requests_per_s"], 3)
            if convoy["p50_us"]:
                row["peer_p50_over_convoy"] = round(peer["p50_us"] / convoy["p50_us"], 3)
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Target:
    """One of issue #8's goals, checked against the report (reported, never asserted in tests)."""

    description: str
    peer: str  # "" for Convoy's own latency goal
    protocol: str
    concurrency: int
    #: "ratio": Convoy/peer throughput >= goal; "p50_us": Convoy's p50 <= goal.
    kind: str
    goal: float


TARGETS = (
    Target("gRPC c=32 throughput >= 1.5x PyTriton (aim 2x)", "pytriton", "grpc", 32, "ratio", 1.5),
    Target("gRPC c=32 throughput >= 3x MLServer", "mlserver", "grpc", 32, "ratio", 3.0),
    Target("HTTP JSON c=8 throughput >= 5x PyTriton", "pytriton", "http_json", 8, "ratio", 5.0),
    Target("gRPC c=1 p50 <= 0.5 ms", "", "grpc", 1, "p50_us", 500),
)


def check_targets(served: list[dict], peers: list[dict]) -> list[dict]:
    """Each target with the measured value and met True/False, or None when not measured."""
    served_by_key = {_key(run): run for run in served}
    peers_by_name = {entry["name"]: entry for entry in peers}
    results = []
    for target in TARGETS:
        value = None
        if target.kind == "p50_us":
            run = served_by_key.get((target.protocol, target.concurrency), {})
            value = run.get("p50_us") if "error" not in run else None
        else:
            for row in peers_by_name.get(target.peer, {}).get("pairs", []):
                if (row["protocol"], row["concurrency"]) == (target.protocol, target.concurrency):
                    value = row["convoy_over_peer"]
        met = None
        if value is not None:
            met = value >= target.goal if target.kind == "ratio" else value <= target.goal
        results.append({"target": target.description, "value": value, "goal": target.goal, "met": met})
    return results


def _number(value, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def markdown(peers: list[dict], targets: list[dict]) -> list[str]:
    """The "Peers" section of one workload's report."""
    lines = ["### Peers", ""]
    for entry in peers:
        title = f"**{entry['name']}** ({entry['description']})"
        if entry["status"] != "measured":
            lines += [f"{title}: {entry['status']}.", ""]
            continue
        versions = ", ".join(f"{name} {version}" for name, version in entry.get("versions", {}).items())
        lines += [
            f"{title} [{versions}], driven by {DRIVER_LABELS[entry['driver']]}; "
            "Convoy driven the same way:",
            "",
            "| protocol | concurrency | Convoy req/s | peer req/s | Convoy / peer "
            "| Convoy p50 / p99 µs | peer p50 / p99 µs | peer p50 / Convoy p50 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in entry["pairs"]:
            convoy, peer = row["convoy"], row["peer"]
            lines.append(
                f"| {PROTOCOL_LABELS.get(row['protocol'], row['protocol'])} | {row['concurrency']} "
                f"| {_cell(convoy, 'requests_per_s')} | {_cell(peer, 'requests_per_s')} "
                f"| {_number(row['convoy_over_peer'], 2)} "
                f"| {_latency(convoy)} | {_latency(peer)} | {_number(row['peer_p50_over_convoy'], 1)} |"
            )
        lines.append("")
    if targets:
        lines += ["Targets (issue #8):", ""]
        for target in targets:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
            value = target["value"]
            shown = "" if value is None else f": {value:,}"
            lines.append(f"- {target['target']}{shown} → {verdict}")
        lines.append("")
    return lines


def _cell(side: dict, field: str) -> str:
    if side.get("error"):
        return "error"
    return _number(side.get(field)) + (" (unstable)" if side.get("unstable") else "")


def _latency(side: dict) -> str:
    if side.get("error"):
        return "error"
    return f"{_number(side.get('p50_us'))} / {_number(side.get('p99_us'))}"
