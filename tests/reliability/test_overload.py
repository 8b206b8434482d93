"""Driven past capacity, the server answers every request exactly once: its own correct result,
or an explicit RESOURCE_EXHAUSTED/429 or DEADLINE_EXCEEDED/504; and it serves normally after.

Load is open-loop (requests start on a fixed schedule whatever the answers), alternating
tritonclient HTTP and gRPC (both asyncio clients), each payload encoding its request id.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio
from helpers import FRONTENDS
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.frontends(FRONTENDS[0])

MODEL = "capacity"
MEASURE_SECONDS = 2.0
OVERLOAD_SECONDS = 5.0
OVERLOAD_FACTOR = 2.5
MAX_REQUESTS = 4000
CLIENT_TIMEOUT_S = 30.0

#: What an explicit overload answer looks like on each protocol.
REJECTED = {"429", "StatusCode.RESOURCE_EXHAUSTED"}
EXPIRED = {"504", "StatusCode.DEADLINE_EXCEEDED"}


def payload(request_id: int) -> np.ndarray:
    """A [1, 4] INT64 row that names its request (the model answers row * 3 + 1)."""
    return np.array([[request_id, request_id ^ 0x5A5A, request_id * 31, -request_id]], dtype=np.int64)


def expected(request_id: int) -> np.ndarray:
    return payload(request_id) * 3 + 1


@dataclass
class Outcome:
    request_id: int
    protocol: str
    kind: str  # "ok", "rejected", "expired", or "other: <details>"
    latency_s: float


class Clients:
    """One asyncio HTTP and one asyncio gRPC tritonclient on the server."""

    def __init__(self, server) -> None:
        self.http = httpaio.InferenceServerClient(server.http_url, conn_limit=256)
        self.grpc = grpcaio.InferenceServerClient(server.grpc_url)

    async def close(self) -> None:
        await self.http.close()
        await self.grpc.close()

    async def call(self, request_id: int) -> Outcome:
        protocol = "grpc" if request_id % 2 else "http"
        module = grpcaio if protocol == "grpc" else httpaio
        client = self.grpc if protocol == "grpc" else self.http
        tensor = module.InferInput("IN", [1, 4], "INT64")
        tensor.set_data_from_numpy(payload(request_id))
        started = time.perf_counter()
        try:
            if protocol == "grpc":
                result = await client.infer(
                    MODEL, [tensor], request_id=str(request_id), client_timeout=CLIENT_TIMEOUT_S
                )
            else:
                result = await asyncio.wait_for(
                    client.infer(MODEL, [tensor], request_id=str(request_id)), CLIENT_TIMEOUT_S
                )
        except InferenceServerException as exc:
            status = str(exc.status())
            kind = "rejected" if status in REJECTED else "expired" if status in EXPIRED else None
            return Outcome(
                request_id, protocol, kind or f"other: {status} {exc.message()}", _since(started)
            )
        except Exception as exc:  # a transport failure is a finding, not a crash of the test
            return Outcome(request_id, protocol, f"other: {exc!r}", _since(started))
        latency = _since(started)
        output = result.as_numpy("OUT")
        response = result.get_response(as_json=True) if protocol == "grpc" else result.get_response()
        answer_id = response.get("id")
        if (
            answer_id != str(request_id)
            or output is None
            or not np.array_equal(output, expected(request_id))
        ):
            return Outcome(
                request_id, protocol, f"other: wrong answer id={answer_id} {output!r}", latency
            )
        return Outcome(request_id, protocol, "ok", latency)


def _since(started: float) -> float:
    return time.perf_counter() - started


async def closed_loop(clients: Clients, concurrency: int, seconds: float) -> list[Outcome]:
    """`concurrency` callers back to back for `seconds`: successes per second is the capacity."""
    outcomes: list[Outcome] = []
    stop_at = time.monotonic() + seconds
    counter = iter(range(1_000_000, 1_000_000 + MAX_REQUESTS))

    async def caller() -> None:
        for request_id in counter:
            if time.monotonic() >= stop_at:
                return
            outcomes.append(await clients.call(request_id))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return outcomes


async def open_loop(clients: Clients, rate: float, seconds: float) -> list[Outcome]:
    """Start request i at i / rate seconds, without waiting for earlier answers."""
    count = min(int(rate * seconds), MAX_REQUESTS)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for request_id in range(count):
        delay = start + request_id / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # the schedule itself, not a wait for the server
        tasks.append(asyncio.ensure_future(clients.call(request_id)))
    return list(await asyncio.wait_for(asyncio.gather(*tasks), CLIENT_TIMEOUT_S + seconds))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


async def overload_run(server) -> dict:
    clients = Clients(server)
    try:
        measured = await closed_loop(clients, concurrency=12, seconds=MEASURE_SECONDS)
        capacity = sum(o.kind == "ok" for o in measured) / MEASURE_SECONDS
        offered = max(capacity, 50.0) * OVERLOAD_FACTOR
        started = time.monotonic()
        outcomes = await open_loop(clients, offered, OVERLOAD_SECONDS)
        elapsed = time.monotonic() - started
        after = await closed_loop(clients, concurrency=2, seconds=0.5)
    finally:
        await clients.close()
    return {
        "measured": measured,
        "capacity": capacity,
        "offered": offered,
        "outcomes": outcomes,
        "elapsed": elapsed,
        "after": after,
    }


def test_overload_answers_every_request_once_correctly_or_with_explicit_rejection(reliability_server):
    run = asyncio.run(overload_run(reliability_server))
    outcomes: list[Outcome] = run["outcomes"]
    assert (
        len(outcomes)
        == len({o.request_id for o in outcomes})
        == min(int(run["offered"] * OVERLOAD_SECONDS), MAX_REQUESTS)
    )
    others = [o for o in outcomes + run["measured"] if o.kind.startswith("other")]
    assert not others, f"{len(others)} requests got neither their answer nor a rejection: {others[:5]}"
    kinds = {kind: [o for o in outcomes if o.kind == kind] for kind in ("ok", "rejected", "expired")}
    assert kinds["rejected"] or kinds["expired"], "2.5x capacity must overflow the 8-deep queue"
    assert kinds["ok"], "the model must keep serving at its capacity while overloaded"
    for protocol in ("http", "grpc"):
        assert any(o.protocol == protocol and o.kind == "ok" for o in outcomes)
    # Serving normally afterwards: a light load is answered in full.
    assert run["after"] and all(o.kind == "ok" for o in run["after"]), run["after"][:5]
    refused = kinds["rejected"] + kinds["expired"]
    print(
        f"\noverload: capacity {run['capacity']:.0f} req/s, offered {run['offered']:.0f} req/s "
        f"for {OVERLOAD_SECONDS:.0f} s ({len(outcomes)} requests, finished in {run['elapsed']:.1f} s); "
        f"goodput {len(kinds['ok']) / run['elapsed']:.0f} req/s; "
        f"429/RESOURCE_EXHAUSTED {len(kinds['rejected'])}, "
        f"504/DEADLINE_EXCEEDED {len(kinds['expired'])}; "
        f"rejection latency p50 {percentile([o.latency_s for o in refused], 50):.1f} ms "
        f"p99 {percentile([o.latency_s for o in refused], 99):.1f} ms; "
        f"429 p50 {percentile([o.latency_s for o in kinds['rejected']], 50):.1f} ms; "
        f"success latency p50 {percentile([o.latency_s for o in kinds['ok']], 50):.1f} ms "
        f"p99 {percentile([o.latency_s for o in kinds['ok']], 99):.1f} ms"
    )
