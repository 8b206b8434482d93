"""One entry point for Convoy's performance numbers: served vs raw, gRPC and HTTP, same run.

    python bench/run.py                      # every workload, full measurement
    python bench/run.py --quick              # short windows (what CI runs; checks files, not numbers)
    python bench/run.py --workload mlp --concurrency 1 8 32

For each workload: the raw model in-process at its best batch size (the ceiling), then Convoy
serving it, driven by perf_analyzer with 1-row requests over gRPC and HTTP at each concurrency.
Writes bench/results/<timestamp>.json and .md with ratios (served / raw) and the machine.
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
from workloads import WORKLOADS  # noqa: E402

ROOT = HERE.parent
GPU_WORKLOADS = {"bert_base"}


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def find_perf_analyzer() -> str:
    candidates = [os.environ.get("PERF_ANALYZER", ""), str(ROOT / ".perf_analyzer" / "perf_analyzer")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    found = shutil.which("perf_analyzer")
    if found:
        return found
    raise SystemExit("perf_analyzer not found: run .ci/install_perf_analyzer.sh or set PERF_ANALYZER")


def measure_raw(raw, batch: int, seconds: float) -> dict:
    raw(batch)  # warm
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        raw(batch)
        count += 1
    elapsed = time.perf_counter() - start
    return {"batch": batch, "rows_per_s": round(count * batch / elapsed), "batches": count}


class Server:
    """`convoy serve` in a subprocess on free ports."""

    def __init__(self, repository: Path, log: Path) -> None:
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "convoy",
                "serve",
                "--model-repository",
                str(repository),
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                "--metrics-port",
                "-1",
                "--host",
                "127.0.0.1",
                "--log-level",
                "WARNING",
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        deadline = time.monotonic() + 120
        for line in self.process.stdout:
            if line.startswith("convoy: serving"):
                fields = dict(part.split("=") for part in line.split() if "=" in part)
                self.http, self.grpc = int(fields["http"]), int(fields["grpc"])
                break
            if time.monotonic() > deadline:
                break
        else:
            raise SystemExit(f"convoy did not start; see {log}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def perf_analyzer(
    binary: str,
    model: str,
    protocol: str,
    port: int,
    concurrency: int,
    shapes,
    quick: bool,
    out_csv: Path,
    extra=(),
) -> dict:
    command = [
        binary,
        "-m",
        model,
        "-u",
        f"127.0.0.1:{port}",
        "-i",
        protocol,
        "--concurrency-range",
        str(concurrency),
        "-f",
        str(out_csv),
    ]
    if quick:
        command += [
            "--measurement-mode",
            "count_windows",
            "--measurement-request-count",
            "200",
            "-r",
            "10",
            "-s",
            "100",
        ]
    else:
        command += ["-p", "3000", "-r", "8", "-s", "25"]
    for shape in shapes:
        command += ["--shape", shape]
    command += list(extra)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not out_csv.exists():
        return {"error": (done.stdout + done.stderr)[-800:]}
    with out_csv.open() as handle:
        row = next(csv.DictReader(handle))
    return {
        "requests_per_s": round(float(row["Inferences/Second"]), 1),
        "p50_us": int(row["p50 latency"]),
        "p99_us": int(row["p99 latency"]),
        "server_queue_us": int(row.get("Server Queue", 0) or 0),
        "server_compute_us": int(row.get("Server Compute Infer", 0) or 0),
    }


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"# Convoy benchmark {report['started']}",
        "",
        f"Machine: {machine.get('gpu') or 'no GPU'}; {machine['cpu']}, {machine['cores']} cores "
        f"(Python {machine['python']}); "
        "client (perf_analyzer) and server share the machine.",
        f"Command: `{report['command']}`",
        "",
    ]
    for workload in report["workloads"]:
        raw = workload["raw"]
        lines += [
            f"## {workload['name']}: {workload['description']}",
            "",
            f"Raw in-process: {raw['rows_per_s']:,} rows/s at batch {raw['batch']}.",
            "",
            "| protocol | concurrency | requests/s | p50 µs | p99 µs | served / raw |",
            "|---|---|---|---|---|---|",
        ]
        for run in workload["served"]:
            if "error" in run:
                lines.append(f"| {run['protocol']} | {run['concurrency']} | error | | | |")
                continue
            lines.append(
                f"| {run['protocol']} | {run['concurrency']} | {run['requests_per_s']:,.0f} | "
                f"{run['p50_us']} | {run['p99_us']} | {run['served_over_raw']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--workload",
        nargs="*",
        default=None,
        choices=list(WORKLOADS),
        help="default: all (--quick: mlp only)",
    )
    parser.add_argument("--concurrency", nargs="*", type=int, default=None)
    parser.add_argument("--protocol", nargs="*", default=["grpc", "http"], choices=["grpc", "http"])
    parser.add_argument("--quick", action="store_true", help="short windows; CI checks the files")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    concurrencies = args.concurrency or ([1, 8] if args.quick else [1, 8, 32])
    binary = find_perf_analyzer()
    started = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "started": started,
        "command": " ".join(["python", *sys.argv]),
        "machine": describe(),
        "workloads": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="convoy-bench-") as scratch:
        scratch = Path(scratch)
        default = [w for w in WORKLOADS if (w in GPU_WORKLOADS) == has_cuda()]
        for name in args.workload or (["mlp"] if args.quick else default):
            workload = WORKLOADS[name]
            repository = scratch / name / "models"
            raw = workload.build(repository)
            result = {
                "name": name,
                "description": workload.description,
                "raw": measure_raw(raw, workload.raw_batch, 1.0 if args.quick else 5.0),
                "served": [],
            }
            server = Server(repository, scratch / name / "server.log")
            try:
                for protocol in args.protocol:
                    port = server.grpc if protocol == "grpc" else server.http
                    for concurrency in concurrencies:
                        run = perf_analyzer(
                            binary,
                            name,
                            protocol,
                            port,
                            concurrency,
                            workload.shapes,
                            args.quick,
                            scratch / f"{name}-{protocol}-{concurrency}.csv",
                            workload.perf_args,
                        )
                        run.update(protocol=protocol, concurrency=concurrency)
                        if "requests_per_s" in run:
                            run["served_over_raw"] = run["requests_per_s"] / result["raw"]["rows_per_s"]
                        result["served"].append(run)
                        print(json.dumps({"workload": name, **run}), flush=True)
            finally:
                server.stop()
            report["workloads"].append(result)
    (args.out / f"{started}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{started}.md").write_text(markdown(report))
    print(markdown(report))
    failed = [r for w in report["workloads"] for r in w["served"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
