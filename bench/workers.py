"""How `convoy serve --workers N` scales the front end: perf_analyzer throughput per worker count.

    python bench/workers.py                              # --workers 1,2,4; gRPC and HTTP; c=1 and 32
    python bench/workers.py --workers 1 2 4 8 --concurrency 1 64 --seconds 5
    python bench/workers.py --quick                      # short windows: checks the script, not numbers

For each worker count, one server on the demo `add_sub` model (or --repository/--model), then
perf_analyzer with 1-row requests over gRPC and HTTP at each concurrency. Workers 1 is today's
single process (no engine, no IPC), so concurrency 1 p50 of workers 1 vs 2 is the cost of the hop
to the engine. Writes bench/results/workers-<timestamp>.json and .md with the machine.

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

    def __init__(self, repository: Path | None, model: str, workers: int, log: Path) -> None:
        command = [sys.executable, "-m", "convoy", "serve", "--workers", str(workers)]
        if repository is not None:
            command += ["--model-repository", str(repository)]
        command += [
            "--model-control-mode", "explicit", "--load-model", model,
            "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "-1",
            "--log-level", "WARNING",
        ]  # fmt: skip
        self.log = log.open("w")
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
    hop = report.get("ipc_p50_us")
    if hop:
        lines += [
            "",
            "Concurrency 1, p50 with workers 2 minus p50 with workers 1 (the hop to the engine):",
        ]
        lines += [f"- {protocol}: {delta:+d} µs" for protocol, delta in hop.items()]
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--quick", action="store_true", help="short count windows (CI)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    binary = find_perf_analyzer()
    started = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    report = {
        "started": started,
        "machine": describe(),
        "model": args.model,
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
                args.repository, args.model, workers, Path(scratch) / f"server-{workers}.log"
            )
            try:
                for protocol in args.protocols:
                    port = server.grpc if protocol == "grpc" else server.http
                    for concurrency in args.concurrency:
                        out_csv = Path(scratch) / f"{workers}-{protocol}-{concurrency}.csv"
                        run = perf_analyzer(
                            binary, args.model, protocol, port, concurrency, args.seconds,
                            args.quick, args.shape, out_csv,
                        )  # fmt: skip
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
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"workers-{started}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"report: {stem}.md ({stem}.json)")
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
