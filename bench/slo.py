"""Latency objective vs fixed batching configurations: goodput and p99 at 50%, 90%, 150% of capacity.

    python bench/slo.py [--objective-ms 50] [--seconds 3] [--report bench/reports/slo-...]

The model is a fake with a known cost curve: each batch sleeps FIXED + PER_ROW x rows on its
instance's thread (sleeping, not burning CPU: it stands for an accelerator, and keeps the
2 shared cores for the scheduler and the load generator). It runs in-process behind Convoy's
real Scheduler, no network, so what is compared is the batching policy alone.

1. Capacity: closed loop, many callers, max batch size, no delay: rows/s served.
2. For each offered load (a fraction of capacity), open loop (Poisson arrivals, 1-row requests,
   the same seeded schedule for every configuration):
   - the SLO configuration: max_batch_size, a max_queue_delay ceiling, latency_slo_ms;
   - a sweep of fixed configurations, max_batch_size x max_queue_delay, each with a queue
     timeout equal to the objective (timeout_action REJECT), the strongest static setting:
     without it a fixed configuration past capacity queues without bound; with it Convoy's
     deadline-aware admission also refuses on arrival what its one-cost estimate says is late.
   Goodput = answers within the objective per second of offered load; p99 = over the admitted
   requests that were answered (arrival to answer).
Target: SLO goodput >= 90% of the best fixed configuration's, its p99 inside the objective.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe

from convoy.batching.scheduler import Scheduler
from convoy.batching.stats import ModelStats
from convoy.config import DynamicBatching, ModelConfig, QueuePolicy, TimeoutAction
from convoy.errors import ConvoyError
from convoy.runtimes.base import RuntimeBase, RuntimeInstance
from convoy.types import Request, TensorSpec

FIXED_S = 0.008
PER_ROW_S = 0.0005
MAX_BATCH = 32
LOADS = (0.5, 0.9, 1.5)
FIXED_SWEEP = tuple((size, delay) for size in (4, 8, 16, 32) for delay in (0, 2000, 10_000))
SLO_DELAY_US = 10_000
WARMUP_S = 0.3


class CostCurveRuntime(RuntimeBase):
    """OUT = IN after sleeping FIXED_S + PER_ROW_S per row (the known cost curve)."""

    def load(self) -> None:
        pass

    def infer(self, inputs):
        x = inputs["IN"]
        time.sleep(FIXED_S + PER_ROW_S * x.shape[0])
        return {"OUT": x}

    def close(self) -> None:
        pass


def config(max_batch: int, delay_us: int, objective_ms: float, slo: bool) -> ModelConfig:
    policy = QueuePolicy()
    if not slo:
        policy = QueuePolicy(
            timeout_action=TimeoutAction.REJECT, default_timeout_us=int(objective_ms * 1000)
        )
    return ModelConfig(
        name="curve",
        backend="bench",
        max_batch_size=max_batch,
        inputs=(TensorSpec("IN", "FP32", (4,)),),
        outputs=(TensorSpec("OUT", "FP32", (4,)),),
        dynamic_batching=DynamicBatching(max_queue_delay_us=delay_us, default_queue_policy=policy),
        latency_slo_ms=objective_ms if slo else 0.0,
    )


def one_row(row: np.ndarray, future, received_ns: int = 0) -> Request:
    return Request("", {"IN": row}, (), 1, future, received_ns=received_ns or time.monotonic_ns())


async def capacity(seconds: float) -> float:
    """Rows/s at max batch size, closed loop with 4 x max batch callers."""
    instance = RuntimeInstance(CostCurveRuntime(), "curve-0")
    stats = ModelStats()
    loop = asyncio.get_running_loop()
    row = np.zeros((1, 4), dtype=np.float32)
    stop_at = time.monotonic() + seconds
    async with Scheduler(config(MAX_BATCH, 0, 0, False), "1", [instance], stats, 1 << 16) as scheduler:

        async def caller() -> None:
            while time.monotonic() < stop_at:
                future = loop.create_future()
                scheduler.submit(one_row(row, future))
                await future

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(4 * MAX_BATCH)))
        elapsed = time.monotonic() - started
    await instance.close()
    return stats.inference_count / elapsed


async def open_loop(model: ModelConfig, arrivals: np.ndarray, objective_ms: float) -> dict:
    """Submit a 1-row request at each arrival offset (s); every outcome and latency."""
    instance = RuntimeInstance(CostCurveRuntime(), "curve-0")
    stats = ModelStats()
    loop = asyncio.get_running_loop()
    row = np.zeros((1, 4), dtype=np.float32)
    latencies_ns: list[int] = []
    refused = failed = 0
    futures = []

    def answered(future, submitted: int) -> None:
        nonlocal failed
        if future.exception() is None:
            latencies_ns.append(time.monotonic_ns() - submitted)
        else:
            failed += 1

    async with Scheduler(model, "1", [instance], stats, 1 << 16) as scheduler:
        # Warm-up, not counted: 8 callers back to back for WARMUP_S (the SLO configuration
        # learns its cost curve from these batches; a fixed one gets the same).
        stop_at = time.monotonic() + WARMUP_S

        async def caller() -> None:
            while time.monotonic() < stop_at:
                future = loop.create_future()
                try:
                    scheduler.submit(one_row(row, future))
                except ConvoyError:
                    await asyncio.sleep(0.001)
                    continue
                await asyncio.wait([future])
                future.exception()  # retrieved: a fixed configuration's queue timeout

        await asyncio.gather(*(caller() for _ in range(8)))
        start = time.monotonic()
        index = 0
        while index < len(arrivals):
            now = time.monotonic() - start
            while index < len(arrivals) and arrivals[index] <= now:
                submitted = time.monotonic_ns()
                future = loop.create_future()
                try:
                    scheduler.submit(one_row(row, future, submitted))
                except ConvoyError:
                    refused += 1
                else:
                    future.add_done_callback(lambda f, s=submitted: answered(f, s))
                    futures.append(future)
                index += 1
            if index < len(arrivals):
                await asyncio.sleep(max(arrivals[index] - (time.monotonic() - start), 0))
        if futures:
            await asyncio.wait(futures, timeout=60)
        limit = scheduler.batch_size_limit
    await instance.close()
    await asyncio.sleep(0)  # let the last done callbacks run
    duration = float(arrivals[-1]) if len(arrivals) else 1.0
    objective_ns = objective_ms * 1e6
    within = sum(1 for latency in latencies_ns if latency <= objective_ns)
    p99 = float(np.percentile(latencies_ns, 99)) / 1e6 if latencies_ns else float("nan")
    return {
        "offered": len(arrivals),
        "answered": len(latencies_ns),
        "refused_on_arrival": refused,
        "failed_after_admission": failed,
        "goodput_per_s": round(within / duration, 1),
        "p99_ms": round(p99, 1),
        "mean_batch": round(stats.inference_count / max(stats.execution_count, 1), 1),
        "batch_size_limit_at_end": limit,
    }


async def run(objective_ms: float, seconds: float, seed: int) -> dict:
    rows_per_s = await capacity(2.0)
    rng = np.random.default_rng(seed)
    results = []
    for fraction in LOADS:
        rate = rows_per_s * fraction
        arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * seconds)))
        slo_config = config(MAX_BATCH, SLO_DELAY_US, objective_ms, True)
        slo = await open_loop(slo_config, arrivals, objective_ms)
        fixed = {}
        for size, delay in FIXED_SWEEP:
            outcome = await open_loop(config(size, delay, objective_ms, False), arrivals, objective_ms)
            fixed[f"max_batch {size}, delay {delay} us"] = outcome
        best_name, best = max(fixed.items(), key=lambda item: item[1]["goodput_per_s"])
        results.append(
            {
                "load": fraction,
                "offered_per_s": round(rate, 1),
                "slo": slo,
                "best_fixed": best_name,
                "slo_goodput_vs_best_fixed": round(
                    slo["goodput_per_s"] / max(best["goodput_per_s"], 1e-9), 3
                ),
                "slo_p99_inside_objective": slo["p99_ms"] <= objective_ms,
                "fixed": fixed,
            }
        )
        print(
            f"load {fraction:.0%}: SLO goodput {slo['goodput_per_s']}/s p99 {slo['p99_ms']} ms "
            f"(refused {slo['refused_on_arrival']}); best fixed {best_name}: goodput "
            f"{best['goodput_per_s']}/s p99 {best['p99_ms']} ms",
            file=sys.stderr,
        )
    return {
        "cost_curve": f"sleep {FIXED_S * 1000:g} ms + {PER_ROW_S * 1000:g} ms per row",
        "max_batch_size": MAX_BATCH,
        "objective_ms": objective_ms,
        "seconds_per_run": seconds,
        "capacity_rows_per_s": round(rows_per_s, 1),
        "slo_max_queue_delay_us": SLO_DELAY_US,
        "results": results,
    }


def markdown(report: dict) -> str:
    lines = [
        f"# Latency objective vs fixed batching ({report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores)",
        "",
        f"`python bench/slo.py --objective-ms {report['objective_ms']:g} --seconds "
        f"{report['seconds_per_run']:g}`: in-process Scheduler, fake model {report['cost_curve']} "
        f"(slept), max batch {report['max_batch_size']}, 1-row requests, Poisson arrivals. "
        f"Capacity {report['capacity_rows_per_s']:.0f} rows/s. Objective {report['objective_ms']:g} ms "
        f"(p99, arrival to answer). Fixed configurations have a queue timeout equal to the objective.",
        "",
        "| load | offered/s | SLO goodput/s | SLO p99 ms | SLO refused | best fixed "
        "| its goodput/s | its p99 ms | SLO / best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        slo = row["slo"]
        best = row["fixed"][row["best_fixed"]]
        lines.append(
            f"| {row['load']:.0%} | {row['offered_per_s']:.0f} | {slo['goodput_per_s']:.0f} "
            f"| {slo['p99_ms']} | {slo['refused_on_arrival']} | {row['best_fixed']} "
            f"| {best['goodput_per_s']:.0f} | {best['p99_ms']} "
            f"| {row['slo_goodput_vs_best_fixed']:.2f} |"
        )
    lines += [
        "",
        "Every fixed configuration (goodput/s, p99 ms of answered, refused on arrival by "
        "deadline-aware admission, expired in queue):",
        "",
    ]
    lines.append("| configuration | " + " | ".join(f"{r['load']:.0%}" for r in report["results"]) + " |")
    lines.append("|---|" + "---|" * len(report["results"]))
    for name in report["results"][0]["fixed"]:
        cells = []
        for row in report["results"]:
            outcome = row["fixed"][name]
            goodput, p99 = outcome["goodput_per_s"], outcome["p99_ms"]
            refused, expired = outcome["refused_on_arrival"], outcome["failed_after_admission"]
            cells.append(f"{goodput:.0f}, {p99}, {refused}, {expired}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rewrite(report_path: Path) -> None:
    """Regenerate REPORT.md from REPORT.json (no measuring)."""
    report = json.loads(report_path.with_suffix(".json").read_text())
    report_path.with_suffix(".md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--objective-ms", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=3.0, help="offered load per run")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--report", type=Path, help="write REPORT.json and REPORT.md")
    parser.add_argument("--rewrite", action="store_true", help="only regenerate REPORT.md")
    args = parser.parse_args()
    if args.rewrite:
        rewrite(args.report)
        return
    report = asyncio.run(run(args.objective_ms, args.seconds, args.seed))
    report["machine"] = describe()
    print(json.dumps(report, indent=2))
    if args.report:
        args.report.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.report.with_suffix(".md").write_text(markdown(report))


if __name__ == "__main__":
    main()
