"""What process isolation costs a Triton python-backend model: in the server's process (the
default, with runtimes/exit_guard.py refusing os._exit and fatal signals) vs `--isolation process`
(each instance in a worker process, which survives anything, segfaults included).

One TritonPythonModel add_sub (the demo add_sub's config: FP32 [16] x 2, max batch 64, 2 ms
queue delay, 2 instances) is served once per mode, the modes alternating ROUNDS times (order
swapped each round) so drift on a shared machine shows. perf_analyzer over gRPC, 1-row requests:
concurrency 1 (p50 latency) and CONCURRENCY (requests/s); during the second, the CPU time of the
server and all its worker processes per request served (from /proc, via psutil).

    .venv/bin/python bench/python_isolation.py [--rounds 3] [--seconds 4] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from drivers import find_perf_analyzer, perf_analyzer  # noqa: E402
from python_backend import TRITON_ADD_SUB  # noqa: E402

from convoy.cli import demo_repository  # noqa: E402

MODEL = "triton_add_sub"


def build_repository(root: Path) -> Path:
    repository = root / "models"
    (repository / MODEL / "1").mkdir(parents=True)
    config = (demo_repository() / "add_sub" / "config.pbtxt").read_text()
    (repository / MODEL / "config.pbtxt").write_text(
        config.replace('name: "add_sub"', f'name: "{MODEL}"')
    )
    (repository / MODEL / "1" / "model.py").write_text(TRITON_ADD_SUB)
    return repository


def start(repository: Path, log: Path, isolation: str) -> tuple[subprocess.Popen, int, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "convoy", "serve", "--model-repository", str(repository),
         "--isolation", isolation, "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
         "--metrics-port", "-1"],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )  # fmt: skip
    for line in process.stdout:
        if line.startswith("convoy: serving"):
            fields = dict(part.split("=") for part in line.split() if "=" in part)
            http, grpc = int(fields["http"]), int(fields["grpc"])
            break
    else:
        raise SystemExit(f"server did not start:\n{log.read_text()[-2000:]}")
    deadline = time.monotonic() + 60
    while requests.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit("server not ready")
        time.sleep(0.1)
    return process, http, grpc


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of the server and every process under it (the isolated workers)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in (root, *root.children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def successes(http: int) -> int:
    stats = requests.get(f"http://127.0.0.1:{http}/v2/models/{MODEL}/stats", timeout=10).json()
    return stats["model_stats"][0]["inference_stats"]["success"]["count"]


def measure(binary: str, repository: Path, root: Path, isolation: str, args, tag: str) -> dict:
    process, http, grpc = start(repository, root / f"server-{tag}.log", isolation)
    extra = ("-p", str(int(args.seconds * 1000)), "-r", "4", "-s", "50")
    try:
        one = perf_analyzer(binary, MODEL, "grpc", grpc, 1, (), False, root / f"c1-{tag}.csv", extra)
        before_cpu, before_count = tree_cpu_seconds(process.pid), successes(http)
        many = perf_analyzer(
            binary, MODEL, "grpc", grpc, args.concurrency, (), False, root / f"cN-{tag}.csv", extra
        )
        cpu = tree_cpu_seconds(process.pid) - before_cpu
        served = max(successes(http) - before_count, 1)
    finally:
        process.terminate()
        process.wait(30)
    return {
        "isolation": isolation,
        "c1_p50_us": one.get("p50_us", one.get("error")),
        f"c{args.concurrency}_requests_per_s": many.get("requests_per_s", many.get("error")),
        f"c{args.concurrency}_p50_us": many.get("p50_us"),
        "cpu_us_per_request": round(cpu * 1e6 / served, 1),
        "unstable": bool(one.get("unstable") or many.get("unstable")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="perf_analyzer window")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    binary = find_perf_analyzer()
    report: dict = {
        "machine": f"{platform.node()} ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})",
        "rounds": [],
    }
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        repository = build_repository(root)
        for index in range(args.rounds):
            order = ("thread", "process") if index % 2 == 0 else ("process", "thread")
            row = {
                mode: measure(binary, repository, root, mode, args, f"{mode}-{index}") for mode in order
            }
            report["rounds"].append(row)
            print(json.dumps(row), flush=True)
    ratios = {"c1_p50": [], "cpu": [], "throughput": []}
    key = f"c{args.concurrency}_requests_per_s"
    for row in report["rounds"]:
        thread, process = row["thread"], row["process"]
        if isinstance(thread["c1_p50_us"], int) and isinstance(process["c1_p50_us"], int):
            ratios["c1_p50"].append(round(process["c1_p50_us"] / thread["c1_p50_us"], 2))
        ratios["cpu"].append(round(process["cpu_us_per_request"] / thread["cpu_us_per_request"], 2))
        if isinstance(thread[key], float) and isinstance(process[key], float):
            ratios["throughput"].append(round(process[key] / thread[key], 2))
    report["process_vs_thread"] = ratios
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
