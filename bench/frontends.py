"""The native front end against the Python one: server CPU per request, split by thread, and
perf_analyzer's throughput and latency, measured in one run on the same machine.

    python bench/frontends.py                        # add_sub 1-row, gRPC and HTTP, c=1 and 64
    python bench/frontends.py --concurrency 1 32 64 --seconds 5 --frontends python native
    python bench/frontends.py --quick                # short windows: checks the script, not numbers

For each front end, one `convoy serve --frontend X` with only the model under test, then
perf_analyzer (1-row requests) per protocol and concurrency. Around each measurement the server
process's threads are read from /proc/<pid>/task: user+system CPU of the native front end's
threads ("convoy-wire"), of the event loop's thread (Python: the scheduler, the engine, and on
the Python front end grpc.aio / uvicorn too), and of the rest (model instance threads, grpc's
own threads), each divided by the requests the model served meanwhile (its statistics). CPU per
request is steadier than a rate on a shared machine; the ratio python ÷ native is the result.
Writes bench/results/frontends-<timestamp>.json and .md with the machine.

On the 2-core development machine perf_analyzer shares the cores with the server: throughput
is then bounded by the client as much as by the server, hence the CPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import describe  # noqa: E402
from workers import Server, find_perf_analyzer, perf_analyzer  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process's threads, summed by role."""
    roles = {"native": 0.0, "loop": 0.0, "other": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        seconds = (int(fields[11]) + int(fields[12])) / TICK
        if name.startswith("convoy-wire"):
            roles["native"] += seconds
        elif task.name == str(pid):
            roles["loop"] += seconds
        else:
            roles["other"] += seconds
    return roles


def measure(server: Server, binary: str, protocol: str, concurrency: int, args, scratch: Path) -> dict:
    port = server.grpc if protocol == "grpc" else server.http
    before_cpu, before = thread_cpu(server.process.pid), server.served()
    result = perf_analyzer(
        binary,
        server.model,
        protocol,
        port,
        concurrency,
        args.seconds,
        args.quick,
        args.shape,
        scratch / f"{protocol}-{concurrency}-{time.monotonic_ns()}.csv",
    )
    after_cpu, served = thread_cpu(server.process.pid), server.served() - before
    if served:
        per_request = {
            role: round((after_cpu[role] - before_cpu[role]) / served * 1e6, 1) for role in after_cpu
        }
        per_request["total"] = round(sum(per_request.values()), 1)
        result["cpu_us_per_request"] = per_request
    result["served"] = served
    return result


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"# Native vs Python front end, {report['started']}",
        "",
        f"Machine: {machine.get('gpu') or 'no GPU'}; {machine['cpu']}, {machine['cores']} cores. "
        f"Model `{report['model']}`, 1-row requests, perf_analyzer on the same machine. Command: "
        f"`{report['command']}`.",
        "",
        "| protocol | c | front end | req/s | p50 ms | p99 ms | server CPU µs/req "
        "| native threads | loop thread | other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        cpu = run.get("cpu_us_per_request", {})
        if "error" in run:
            lines.append(
                f"| {run['protocol']} | {run['concurrency']} | {run['frontend']} "
                f"| error: {run['error'][:80]} |"
            )
            continue
        lines.append(
            f"| {run['protocol']} | {run['concurrency']} | {run['frontend']} "
            f"| {run['requests_per_s']} | "
            f"{run['p50_us'] / 1000:.2f} | {run['p99_us'] / 1000:.2f} | {cpu.get('total', '-')} | "
            f"{cpu.get('native', '-')} | {cpu.get('loop', '-')} | {cpu.get('other', '-')} |"
        )
    ratios = report.get("ratios", [])
    if ratios:
        lines += [
            "",
            "| protocol | c | CPU/req python ÷ native | req/s native ÷ python |",
            "|---|---|---|---|",
        ]
        for ratio in ratios:
            lines.append(
                f"| {ratio['protocol']} | {ratio['concurrency']} "
                f"| {ratio['cpu']} | {ratio['throughput']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--frontends", nargs="+", default=["python", "native"], choices=["python", "native"]
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--protocols", nargs="+", default=["grpc", "http"], choices=["grpc", "http"])
    parser.add_argument("--repository", type=Path, default=None, help="default: the bundled demo models")
    parser.add_argument("--model", default="add_sub")
    parser.add_argument("--shape", action="append", default=[], help="perf_analyzer --shape NAME:D1,D2")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measurement window")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the front ends this many times")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra convoy serve argument")
    parser.add_argument("--quick", action="store_true", help="short count windows (CI)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    binary = find_perf_analyzer()
    started = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for round_ in range(args.rounds):
            for frontend in args.frontends:
                extra = ["--frontend", frontend, *args.serve_arg]
                server = Server(args.repository, args.model, 1, scratch / f"{frontend}.log", extra)
                try:
                    for protocol in args.protocols:
                        for concurrency in args.concurrency:
                            result = measure(server, binary, protocol, concurrency, args, scratch)
                            result.update(
                                frontend=frontend,
                                protocol=protocol,
                                concurrency=concurrency,
                                round=round_,
                            )
                            runs.append(result)
                            print(json.dumps(result), flush=True)
                finally:
                    server.stop()
    ratios = []
    for protocol in args.protocols:
        for concurrency in args.concurrency:

            def mean(frontend, key, protocol=protocol, concurrency=concurrency):
                values = [
                    (r["cpu_us_per_request"]["total"] if key == "cpu" else r["requests_per_s"])
                    for r in runs
                    if r["frontend"] == frontend
                    and r["protocol"] == protocol
                    and r["concurrency"] == concurrency
                    and "error" not in r
                    and "cpu_us_per_request" in r
                ]
                return sum(values) / len(values) if values else None

            python_cpu, native_cpu = mean("python", "cpu"), mean("native", "cpu")
            python_rate, native_rate = mean("python", "rate"), mean("native", "rate")
            if python_cpu and native_cpu:
                ratios.append(
                    {
                        "protocol": protocol,
                        "concurrency": concurrency,
                        "cpu": round(python_cpu / native_cpu, 2),
                        "throughput": round(native_rate / python_rate, 2) if python_rate else None,
                    }
                )
    report = {
        "started": started,
        "machine": describe(),
        "model": args.model,
        "command": "python bench/frontends.py " + " ".join(sys.argv[1:]),
        "runs": runs,
        "ratios": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"frontends-{started}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"frontends-{started}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
