"""How `convoy serve --workers N` scales the front end: perf_analyzer throughput per worker count.

    python bench/workers.py                              # --workers 1,2,4; gRPC and HTTP; c=1 and 32
    python bench/workers.py --workers 1 2 4 8 --concurrency 1 64 --seconds 5
    python bench/workers.py --quick                      # short windows: checks the script, not numbers
    # 600 KB inputs through the front ends' shared-memory arenas, and without them:
    python bench/workers.py --workers 2 --concurrency 8 --repository bench/large_input_models \
        --model image_identity --shape INPUT0:3,224,224 [--serve-arg=--ipc-arena-mb=0]

For each worker count, one server on the demo `add_sub` model (or --repository/--model), then
perf_analyzer with 1-row requests over gRPC and HTTP at each concurrency. Workers 1 is a single
process (no engine, no IPC), so concurrency 1 p50 of workers 1 vs 2 is the cost of the hop to the
engine. Around every run the user+system CPU time of each process role (single process; engine;
each front end) is read from /proc and divided by the requests the model served in that time:
CPU µs per request by role, steadier than a rate on a shared machine, and from them the
throughput an N-core host would reach with N-1 front ends and one engine (--project-cores).
Writes bench/results/workers-<timestamp>.json and .md with the machine.

What to expect: the front ends scale with cores. On a host where perf_analyzer shares the
same few cores as the server (the 2-core development machine), more workers mostly compete
with the client and the engine for those cores; run it on a many-core host for the scaling.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import describe  # noqa: E402

ROOT = HERE.parent


def find_perf_analyzer() -> str:
    for candidate in (
        os.environ.get("PERF_ANALYZER", ""),
        str(ROOT / ".perf_analyzer" / "perf_analyzer"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    found = shutil.which("perf_analyzer")
    if found:
        return found
    raise SystemExit("perf_analyzer not found: run .ci/install_perf_analyzer.sh or set PERF_ANALYZER")


class Server:
    """`convoy serve --workers N` on free ports, only the model under test loaded."""

    def __init__(
        self, repository: Path | None, model: str, workers: int, log: Path, extra: list[str]
    ) -> None:
        command = [sys.executable, "-m", "convoy", "serve", "--workers", str(workers), *extra]
        if repository is not None:
            command += ["--model-repository", str(repository)]
        command += [
            "--model-control-mode", "explicit", "--load-model", model,
            "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "-1",
            "--log-level", "WARNING",
        ]  # fmt: skip
        self.log = log.open("w")
        self.model = model
        self.workers = workers
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        deadline = time.monotonic() + 180
        self.http = self.grpc = 0
        for line in self.process.stdout:
            if line.startswith("convoy: serving"):
                fields = dict(part.split("=") for part in line.split() if "=" in part)
                self.http, self.grpc = int(fields["http"]), int(fields["grpc"])
                break
            if time.monotonic() > deadline:
                break
        if not self.http:
            self.stop()
            raise SystemExit(f"convoy --workers {workers} did not start; see {log}")

    def roles(self) -> dict[str, list[int]]:
        """Process ids by role: the single process, or the engine and its front ends."""
        import psutil

        if self.workers == 1:
            return {"single process": [self.process.pid]}
        children = psutil.Process(self.process.pid).children()
        workers = [c.pid for c in children if "convoy.server.workers" in " ".join(c.cmdline())]
        return {"engine": [self.process.pid], "front end": workers}

    def cpu_seconds(self) -> dict[str, list[float]]:
        import psutil

        out = {}
        for role, pids in self.roles().items():
            times = [psutil.Process(pid).cpu_times() for pid in pids]
            out[role] = [t.user + t.system for t in times]
        return out

    def served(self) -> int:
        """Requests the model answered successfully so far (the statistics extension)."""
        import urllib.request

        url = f"http://127.0.0.1:{self.http}/v2/models/{self.model}/stats"
        with urllib.request.urlopen(url, timeout=10) as answer:
            stats = json.load(answer)["model_stats"]
        return sum(s["inference_stats"]["success"]["count"] for s in stats)

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=90)
        self.log.close()
        return code


def perf_analyzer(binary, model, protocol, port, concurrency, seconds, quick, shapes, out_csv) -> dict:
    command = [
        binary, "-m", model, "-u", f"127.0.0.1:{port}", "-i", protocol,
        "--concurrency-range", str(concurrency), "-f", str(out_csv),
    ]  # fmt: skip
    if quick:
        command += ["--measurement-mode", "count_windows", "--measurement-request-count", "200"]
        command += ["-r", "10", "-s", "100"]
    else:
        command += ["-p", str(int(seconds * 1000)), "-r", "8", "-s", "25"]
    for shape in shapes:
        command += ["--shape", shape]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    unstable = done.returncode != 0 and "stable measurement" in done.stdout + done.stderr
    if unstable:
        # A busy shared machine: accept any window (-s 100) rather than report nothing; flagged.
        command += ["-s", "100"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not out_csv.exists():
        return {"error": (done.stdout + done.stderr)[-800:]}
    with out_csv.open() as handle:
        row = next(csv.DictReader(handle))
    return {
        "requests_per_s": round(float(row["Inferences/Second"]), 1),
        "p50_us": int(row["p50 latency"]),
        "p99_us": int(row["p99 latency"]),
        "unstable": unstable,
    }


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"# convoy --workers scaling, {report['started']}",
        "",
        f"Machine: {machine.get('gpu') or 'no GPU'}; {machine['cpu']}, {machine['cores']} cores "
        f"(Python {machine['python']}); perf_analyzer shares the machine with the server.",
        f"Model `{report['model']}`, 1-row requests, {report['window']}.",
        "",
        "(unstable: perf_analyzer found no window within 25% of the next two; the last was kept.)",
        "",
        "| protocol | concurrency | workers | requests/s | p50 µs | p99 µs | vs workers 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for protocol in report["protocols"]:
        for concurrency in report["concurrency"]:
            runs = [
                r
                for r in report["runs"]
                if r["protocol"] == protocol and r["concurrency"] == concurrency
            ]
            base = next((r for r in runs if r["workers"] == 1 and "requests_per_s" in r), None)
            for run in runs:
                if "error" in run:
                    lines.append(f"| {protocol} | {concurrency} | {run['workers']} | error | | | |")
                    continue
                ratio = f"{run['requests_per_s'] / base['requests_per_s']:.2f}" if base else "-"
                mark = " (unstable)" if run.get("unstable") else ""
                rate = f"{run['requests_per_s']:,.0f}{mark}"
                lines.append(
                    f"| {protocol} | {concurrency} | {run['workers']} | {rate} | "
                    f"{run['p50_us']} | {run['p99_us']} | {ratio} |"
                )
    lines += [
        "",
        "CPU time per request by process role (user+system from /proc over the run / requests served):",
        "",
        "| protocol | concurrency | workers | single process µs | engine µs | front end µs |",
        "|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        cpu = run.get("cpu_us_per_request")
        if not cpu:
            continue
        cells = [cpu.get(role, "") for role in ("single process", "engine", "front end")]
        lines.append(
            f"| {run['protocol']} | {run['concurrency']} | {run['workers']} | "
            + " | ".join(str(c) for c in cells)
            + " |"
        )
    projections = report.get("projections") or []
    if projections:
        lines += [
            "",
            "Projected throughput of a host from these costs (one engine core, the rest front ends):",
            "",
        ]
        lines += [
            "| protocol | concurrency | cores | front ends | limited by | requests/s |",
            "|---|---|---|---|---|---|",
        ]
        for p in projections:
            lines.append(
                f"| {p['protocol']} | {p['concurrency']} | {p['cores']} | {p['front_ends']} | "
                f"{p['limit']} | {p['requests_per_s']:,.0f} |"
            )
    hop = report.get("ipc_p50_us")
    if hop:
        lines += [
            "",
            "Concurrency 1, p50 with workers 2 minus p50 with workers 1 (the hop to the engine):",
        ]
        lines += [f"- {protocol}: {delta:+d} µs" for protocol, delta in hop.items()]
    return "\n".join(lines) + "\n"


def project(runs: list[dict], cores_list: list[int], raw_limit: float) -> list[dict]:
    """For each protocol and concurrency measured through workers: an N-core host with one
    engine core and N-1 front-end cores serves min(front ends, engine, raw model) requests/s."""
    out = []
    for run in runs:
        cpu = run.get("cpu_us_per_request") or {}
        if "engine" not in cpu or not cpu.get("front end"):
            continue
        for cores in cores_list:
            limits = {
                "front ends": (cores - 1) * 1e6 / cpu["front end"],
                "engine": 1e6 / max(cpu["engine"], 1e-3),
            }
            if raw_limit:
                limits["raw model"] = raw_limit
            limit = min(limits, key=limits.get)
            out.append(
                {
                    "protocol": run["protocol"],
                    "concurrency": run["concurrency"],
                    "workers_measured": run["workers"],
                    "cores": cores,
                    "front_ends": cores - 1,
                    "limit": limit,
                    "requests_per_s": round(limits[limit]),
                }
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--protocols", nargs="+", default=["grpc", "http"], choices=["grpc", "http"])
    parser.add_argument("--repository", type=Path, default=None, help="default: the bundled demo models")
    parser.add_argument("--model", default="add_sub")
    parser.add_argument("--shape", action="append", default=[], help="perf_analyzer --shape NAME:D1,D2")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement window")
    parser.add_argument(
        "--serve-arg", action="append", default=[],
        help="an extra `convoy serve` argument (repeat; e.g. --serve-arg=--ipc-arena-mb=0)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="short count windows (CI)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--project-cores", type=int, nargs="+", default=[16],
        help="project the throughput of hosts with these many cores from the measured costs",
    )  # fmt: skip
    parser.add_argument(
        "--raw-limit", type=float, default=0.0,
        help="the model's raw in-process limit (requests/s) to cap projections with (0: none)",
    )  # fmt: skip
    args = parser.parse_args()
    binary = find_perf_analyzer()
    started = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    report = {
        "started": started,
        "machine": describe(),
        "model": args.model,
        "serve_args": args.serve_arg,
        "protocols": args.protocols,
        "concurrency": args.concurrency,
        "window": "200-request count windows"
        if args.quick
        else f"{args.seconds:g} s windows, stable over 3",
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="convoy-bench-workers-") as scratch:
        for workers in args.workers:
            server = Server(
                args.repository,
                args.model,
                workers,
                Path(scratch) / f"server-{workers}.log",
                args.serve_arg,
            )
            try:
                for protocol in args.protocols:
                    port = server.grpc if protocol == "grpc" else server.http
                    for concurrency in args.concurrency:
                        out_csv = Path(scratch) / f"{workers}-{protocol}-{concurrency}.csv"
                        cpu_before, served_before = server.cpu_seconds(), server.served()
                        run = perf_analyzer(
                            binary, args.model, protocol, port, concurrency, args.seconds,
                            args.quick, args.shape, out_csv,
                        )  # fmt: skip
                        served = server.served() - served_before
                        cpu_after = server.cpu_seconds()
                        if served:
                            # Every request passes one front end: a role's CPU over the requests
                            # served is its cost per request, however many processes share it.
                            run["cpu_us_per_request"] = {
                                role: round(
                                    (sum(cpu_after[role]) - sum(cpu_before[role])) * 1e6 / served, 1
                                )
                                for role in cpu_after
                            }
                            run["served"] = served
                        run.update(workers=workers, protocol=protocol, concurrency=concurrency)
                        report["runs"].append(run)
                        shown = run.get("requests_per_s", run.get("error", "")[-200:])
                        print(f"workers {workers} {protocol} c{concurrency}: {shown}", flush=True)
            finally:
                code = server.stop()
                if code != 0:
                    print(f"warning: convoy --workers {workers} exited with {code}", file=sys.stderr)
    report["ipc_p50_us"] = {}
    for protocol in args.protocols:
        one = [r for r in report["runs"] if r["protocol"] == protocol and r["concurrency"] == 1]
        single = next((r for r in one if r["workers"] == 1 and "p50_us" in r), None)
        double = next((r for r in one if r["workers"] == 2 and "p50_us" in r), None)
        if single and double:
            report["ipc_p50_us"][protocol] = double["p50_us"] - single["p50_us"]
    report["projections"] = project(report["runs"], args.project_cores, args.raw_limit)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"workers-{started}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"report: {stem}.md ({stem}.json)")
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
