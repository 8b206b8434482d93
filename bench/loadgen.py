"""A small closed-loop load generator for servers perf_analyzer cannot drive (MLServer).

    python bench/loadgen.py --protocol grpc --url 127.0.0.1:8001 --model mlp --concurrency 32

perf_analyzer needs the ModelConfig RPC/route, which MLServer lacks, so the peer comparison with
MLServer drives *both* servers with this one client: N asyncio workers on uvloop, each sending
its next 1-row FP32 request when the previous answer arrives (perf_analyzer's concurrency mode).
The request is encoded once (gRPC: raw_input_contents, as perf_analyzer sends; HTTP: a JSON
body) so the client spends its CPU on the transport, not on building requests. Prints one JSON
object: requests/s and p50/p99 latency in µs over the measurement window, plus the error count.
It shares the machine with the server it measures: compare its numbers with each other, never
with perf_analyzer's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np

GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def grpc_request(model: str, rows: np.ndarray) -> bytes:
    from convoy.protos import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(rows.shape))
    request.outputs.add(name="OUTPUT0")
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request.SerializeToString()


def http_body(rows: np.ndarray) -> bytes:
    tensor = {
        "name": "INPUT0",
        "shape": list(rows.shape),
        "datatype": "FP32",
        "data": rows.ravel().tolist(),
    }
    return json.dumps({"inputs": [tensor], "outputs": [{"name": "OUTPUT0"}]}).encode()


def percentile_us(latencies: list[float], q: float) -> int:
    return int(np.percentile(np.asarray(latencies), q) * 1e6) if latencies else 0


async def run(args: argparse.Namespace) -> dict:
    rows = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    latencies: list[float] = []
    errors: list[str] = []
    clock = time.perf_counter
    start = clock()
    measure_from = start + args.warmup
    stop_at = measure_from + args.seconds

    if args.protocol == "grpc":
        import grpc

        channel = grpc.aio.insecure_channel(args.url)
        infer = channel.unary_unary(GRPC_METHOD)  # bytes in, bytes out: no per-call encoding
        payload = grpc_request(args.model, rows)

        async def once() -> None:
            await infer(payload, timeout=30)

        close = channel.close
    else:
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.concurrency),
            headers={"Content-Type": "application/json"},
        )
        url = f"http://{args.url}/v2/models/{args.model}/infer"
        payload = http_body(rows)

        async def once() -> None:
            async with session.post(url, data=payload) as answer:
                body = await answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"HTTP {answer.status}: {body[:200]!r}")

        close = session.close

    async def worker() -> None:
        while True:
            sent = clock()
            if sent >= stop_at:
                return
            try:
                await once()
            except Exception as exc:  # counted and reported; a failing server ends the run
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                if len(errors) > 100:
                    return
                continue
            if sent >= measure_from:
                latencies.append(clock() - sent)

    try:
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    finally:
        await close()
    return {
        "requests_per_s": round(len(latencies) / args.seconds, 1),
        "p50_us": percentile_us(latencies, 50),
        "p99_us": percentile_us(latencies, 99),
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--protocol", choices=["grpc", "http"], required=True)
    parser.add_argument("--url", required=True, help="host:port")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds sent but not counted")
    args = parser.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
