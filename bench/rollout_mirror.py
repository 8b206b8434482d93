"""A mirror flood must not hurt production: stable's p99 with every request mirrored to a
candidate five times as costly, inside the shadow budget, against stable's p99 with no roll-out.

    python bench/rollout_mirror.py [--slices 8] [--slice-seconds 3] [--report bench/reports/...]

One `convoy serve` (a real server on loopback ports), one model: version 1 (stable) costs about
1 ms of CPU a batch, version 2 (candidate) about 5 ms, both numpy on one BLAS thread. The client
is this process: closed-loop HTTP at --concurrency, one-row FP32 requests, on the same cores.
Phases, each run for one slice at a time and rotated slice by slice (so a host that is busy with
other work for a while weighs on every phase alike, which whole-phase runs on a shared 2-core
machine did not give):
- baseline: no roll-out;
- shadow at each --budgets share (0.1, and 0.25, the default): every request mirrored
  (mirror.sample_rate 1.0), guards off, so the roll-out neither advances nor rolls back;
- shadow without a budget to speak of (budget 1.0, a queue bound of 100000): what the budget buys.
The first 0.5 s of a slice is not counted (a phase's mirrors still draining). Reported per phase
over all its slices: stable requests/s, p50 and p99 as the client saw them; mirrors sent and
dropped (budget, queue); and the median over slices of the per-slice p99 ratio to the baseline
slice beside it. The bound checked: pooled p99 at budget 0.25 within `--bound` x the pooled
baseline p99 (default 1.5). The machine is named in the report; compare only within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from machine import describe  # noqa: E402

CONFIG = """
name: "served"
backend: "python"
max_batch_size: 16
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 64 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 64 ] } ]
dynamic_batching { max_queue_delay_microseconds: 200 }
version_policy { all { } }
"""

MODEL = """
import time

import numpy as np

WORK_S = {work}
_W = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32) / 16


class Model:
    def execute(self, inputs):
        x = inputs["INPUT0"]
        until = time.perf_counter() + WORK_S
        m = _W
        while time.perf_counter() < until:  # CPU work, as a model on the host would cost
            m = np.tanh(m @ _W)
        return {{"OUTPUT0": x + float(m[0, 0]) * 0}}
"""


def _repository(root: Path) -> Path:
    model = root / "models" / "served"
    for version, work in ((1, 0.001), (2, 0.005)):
        (model / str(version)).mkdir(parents=True)
        (model / str(version) / "model.py").write_text(MODEL.format(work=work))
    (model / "config.pbtxt").write_text(CONFIG)
    return root / "models"


def _serve(root: Path) -> tuple[subprocess.Popen, int]:
    log = (root / "server.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "convoy", "serve", "--model-repository", str(_repository(root)),
         "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "-1",
         "--rollout-state", str(root / "rollouts.json")],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    for line in process.stdout:
        if line.startswith("convoy: serving"):
            port = int(line.split("http=")[1].split()[0])
            break
        if time.monotonic() > deadline:
            raise SystemExit("the server did not start")
    else:
        raise SystemExit(f"the server exited: {(root / 'server.log').read_text()[-2000:]}")
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return process, port
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not become ready")


UNBOUNDED = "shadow, no budget (1.0, queue 100000)"


def _shadow(budget: float, max_queue: int) -> dict:
    return {
        "stable": 1,
        "candidate": 2,
        "mode": "shadow",
        "bake_seconds": 86400,
        "guards": {"max_p99_ratio": None, "max_error_rate_delta": None, "min_agreement": None},
        "mirror": {"sample_rate": 1.0, "budget": budget, "max_queue": max_queue},
    }


class Client:
    """Closed-loop HTTP callers; one slice at a time, raw latencies kept."""

    def __init__(self, port: int, concurrency: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.concurrency = concurrency
        rows = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
        tensor = {"name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": rows.ravel().tolist()}
        self.body = json.dumps({"inputs": [tensor]}).encode()

    async def slice(self, seconds: float, warmup: float) -> tuple[list[float], int]:
        """(latencies in ms after the warm-up, errors)."""
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"{self.base}/v2/models/served/infer"
            clock = time.perf_counter
            begin = clock()
            count_from, stop_at = begin + warmup, begin + warmup + seconds
            latencies: list[float] = []
            errors = 0

            async def caller() -> None:
                nonlocal errors
                while (sent := clock()) < stop_at:
                    async with session.post(url, data=self.body) as answer:
                        await answer.read()
                        if answer.status != 200:
                            errors += 1
                            continue
                    if sent >= count_from:
                        latencies.append((clock() - sent) * 1000)

            await asyncio.gather(*(caller() for _ in range(self.concurrency)))
        return latencies, errors

    def rollout(self, verb: str, body: dict | None = None) -> dict:
        method = "GET" if verb == "" else "POST"
        path = f"/v2/rollouts/served{'/' + verb if verb else ''}"
        answer = requests.request(method, f"{self.base}{path}", json=body, timeout=60)
        answer.raise_for_status()
        return answer.json()


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _measure(client: Client, args) -> list[dict]:
    phases = [("baseline", None)]
    phases += [(f"shadow, budget {b:g}", _shadow(b, 0)) for b in args.budgets]
    phases += [(UNBOUNDED, _shadow(1.0, 100_000))]
    pooled = {
        name: {"latencies": [], "seconds": 0.0, "errors": 0, "slice_p99": []} for name, _ in phases
    }
    mirrors = {name: [0, 0, 0] for name, _ in phases}
    for index in range(args.slices):
        # Rotate the order so no phase always follows the costliest one.
        order = phases[index % len(phases) :] + phases[: index % len(phases)]
        for name, spec in order:
            if spec is not None:
                client.rollout("start", spec)
            latencies, errors = await client.slice(args.slice_seconds, 0.5)
            if spec is not None:
                counted = client.rollout("")["totals"]["mirrors"]
                client.rollout("abort")
                mirrors[name][0] += counted["sent"]
                mirrors[name][1] += counted["dropped_budget"]
                mirrors[name][2] += counted["dropped_queue"]
            entry = pooled[name]
            entry["latencies"] += latencies
            entry["seconds"] += args.slice_seconds
            entry["errors"] += errors
            entry["slice_p99"].append(_p(latencies, 99))
        print(f"slice {index + 1}/{args.slices} done", file=sys.stderr, flush=True)
    baseline = pooled["baseline"]
    out = []
    for name, _ in phases:
        entry = pooled[name]
        ratios = [a / b for a, b in zip(entry["slice_p99"], baseline["slice_p99"], strict=True)]
        out.append(
            {
                "phase": name,
                "requests_per_s": round(len(entry["latencies"]) / entry["seconds"], 1),
                "p50_ms": round(_p(entry["latencies"], 50), 3),
                "p99_ms": round(_p(entry["latencies"], 99), 3),
                "p99_ratio": round(_p(entry["latencies"], 99) / _p(baseline["latencies"], 99), 3),
                "p50_ratio": round(_p(entry["latencies"], 50) / _p(baseline["latencies"], 50), 3),
                "throughput_ratio": round(len(entry["latencies"]) / len(baseline["latencies"]), 3),
                "median_slice_p99_ratio": round(statistics.median(ratios), 3),
                "errors": entry["errors"],
                "mirrors_sent": mirrors[name][0],
                "mirrors_dropped_budget": mirrors[name][1],
                "mirrors_dropped_queue": mirrors[name][2],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=8, help="rounds of one slice per phase")
    parser.add_argument("--slice-seconds", type=float, default=3.0, help="counted seconds per slice")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--budgets",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[0.1, 0.25],
        help="mirror budgets to measure, comma-separated (the bound is checked at 0.25, the default)",
    )
    parser.add_argument(
        "--bound", type=float, default=1.5, help="p99 ratio the default budget must hold"
    )
    parser.add_argument("--report", type=Path, help="write REPORT.json and REPORT.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        process, port = _serve(Path(folder))
        try:
            phases = asyncio.run(_measure(Client(port, args.concurrency), args))
        finally:
            process.terminate()
            process.wait(timeout=60)
    default = next(p for p in phases if p["phase"] == "shadow, budget 0.25")
    result = {
        "machine": describe(),
        "slices": args.slices,
        "slice_seconds": args.slice_seconds,
        "concurrency": args.concurrency,
        "phases": phases,
        "bound": args.bound,
        "p99_ratio_at_default_budget": default["p99_ratio"],
        "within_bound": default["p99_ratio"] <= args.bound,
    }
    for phase in phases:
        print(json.dumps(phase))
    print(json.dumps({k: result[k] for k in ("p99_ratio_at_default_budget", "bound", "within_bound")}))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.report.with_suffix(".md").write_text(_markdown(result))
    return 0 if result["within_bound"] else 1


def _markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        "# Mirror flood vs stable p99 (`bench/rollout_mirror.py`)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['cores_usable']} usable), "
        f"Python {machine['python']}; client and server on the same cores. {result['slices']} "
        f"rotations of {result['slice_seconds']:g} s slices per phase, HTTP closed loop at "
        f"concurrency {result['concurrency']}, one-row requests; stable costs ~1 ms of CPU a batch, "
        "the candidate ~5 ms; every request mirrored.",
        "",
        "| phase | stable req/s (x baseline) | p50 ms (x) | p99 ms (x) | median slice p99 ratio "
        "| mirrors sent | dropped (budget / queue) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in result["phases"]:
        shadow = p["phase"] != "baseline"
        lines.append(
            f"| {p['phase']} | {p['requests_per_s']:,.0f} ({p['throughput_ratio']:.2f}) | "
            f"{p['p50_ms']:.2f} ({p['p50_ratio']:.2f}) | {p['p99_ms']:.2f} ({p['p99_ratio']:.2f}) | "
            f"{p['median_slice_p99_ratio']:.2f} | "
            + (f"{p['mirrors_sent']:,} | {p['mirrors_dropped_budget']:,} / "
               f"{p['mirrors_dropped_queue']:,} |" if shadow else "- | - |")
        )  # fmt: skip
    lines += [
        "",
        "At the default budget (0.25) stable's p99 is "
        f"**{result['p99_ratio_at_default_budget']:.2f}x** its baseline (bound {result['bound']:g}x: "
        f"{'held' if result['within_bound'] else 'NOT held'}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
