"""Requests/s through the scheduler alone (no network, no-op runtime), and the latency it adds.

    python bench/scheduler.py [--concurrency 256] [--requests 200000] [--max-batch 64]
    taskset -c 0 python bench/scheduler.py          # "one core", as the target is stated

Closed loop: `concurrency` coroutines each submit a 1-row request and await its future, like
clients would. Reports JSON with the machine it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe

from convoy.batching.scheduler import Scheduler
from convoy.batching.stats import ModelStats
from convoy.config import DynamicBatching, ModelConfig
from convoy.runtimes.base import RuntimeBase, RuntimeInstance
from convoy.types import Request, TensorSpec


class NoOpRuntime(RuntimeBase):
    def load(self) -> None:
        pass

    def infer(self, inputs):
        return {"OUT": inputs["IN"]}

    def close(self) -> None:
        pass


async def run(concurrency: int, total: int, max_batch: int, delay_us: int) -> dict:
    config = ModelConfig(
        name="noop",
        backend="bench",
        max_batch_size=max_batch,
        inputs=(TensorSpec("IN", "FP32", (4,)),),
        outputs=(TensorSpec("OUT", "FP32", (4,)),),
        dynamic_batching=DynamicBatching(max_queue_delay_us=delay_us),
    )
    stats = ModelStats()
    instance = RuntimeInstance(NoOpRuntime(), "noop-0")
    loop = asyncio.get_running_loop()
    row = np.zeros((1, 4), dtype=np.float32)
    remaining = total
    latencies: list[int] = []

    async with Scheduler(config, "1", [instance], stats, max_queue_size=1 << 20) as scheduler:

        async def client(record: bool) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter_ns()
                future = loop.create_future()
                scheduler.submit(Request("", {"IN": row}, (), 1, future, received_ns=start))
                await future
                if record:
                    latencies.append(time.perf_counter_ns() - start)

        # Latency added at concurrency 1 (the runtime itself is a no-op).
        remaining = 5000
        await client(True)
        single_latency_us = statistics.median(latencies) / 1000
        # Throughput at the requested concurrency.
        remaining = total
        rows_before, batches_before = stats.inference_count, stats.execution_count
        start = time.perf_counter()
        await asyncio.gather(*(client(False) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    await instance.close()
    batches = stats.execution_count - batches_before
    rows = stats.inference_count - rows_before
    return {
        "requests_per_s": round(total / elapsed),
        "concurrency": concurrency,
        "requests": total,
        "mean_batch_size": round(rows / max(batches, 1), 1),
        "added_latency_us_p50_at_concurrency_1": round(single_latency_us, 1),
        "max_batch_size": max_batch,
        "max_queue_delay_us": delay_us,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--delay-us", type=int, default=2000)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    coroutine = run(args.concurrency, args.requests, args.max_batch, args.delay_us)
    if args.no_uvloop:
        result = asyncio.run(coroutine)
        loop_name = "asyncio"
    else:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(coroutine)
        loop_name = "uvloop"
    result["loop"] = loop_name
    result["machine"] = describe()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
