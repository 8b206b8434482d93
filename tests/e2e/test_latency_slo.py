"""A model with a latency objective (`latency_slo_ms`) refuses, on arrival, the requests it
predicts would miss it: a burst far past what fits the objective gets some answers and
explicit RESOURCE_EXHAUSTED / 429 refusals naming the objective, every request exactly one of
the two, and the model's statistics and metrics count the refusals.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio
from helpers import ConvoyProcess, metric_value, open_protocol, serve_until_stopped
from tritonclient.utils import InferenceServerException

MODEL = "slo_model"
OBJECTIVE_MS = 100
BURST = 80
REJECTED = {"429", "StatusCode.RESOURCE_EXHAUSTED"}

#: Batch cost 10 ms + 2 ms a row, slept (it stands for an accelerator's compute).
MODEL_PY = """
import time

import numpy as np


class Model:
    def execute(self, inputs):
        rows = inputs["IN"].shape[0]
        time.sleep(0.010 + 0.002 * rows)
        return {"OUT": inputs["IN"] * np.int64(3) + np.int64(1)}
"""

CONFIG = f"""
name: "{MODEL}"
backend: "python"
max_batch_size: 8
input [ {{ name: "IN", data_type: TYPE_INT64, dims: [ 4 ] }} ]
output [ {{ name: "OUT", data_type: TYPE_INT64, dims: [ 4 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
parameters {{ key: "latency_slo_ms" value {{ string_value: "{OBJECTIVE_MS}" }} }}
"""


@pytest.fixture(scope="module", params=["single-process", "workers"])
def slo_server(request, tmp_path_factory):
    """One process, and `--workers 2` (an engine behind two front-end processes): the batching
    happens in the engine either way."""
    root = tmp_path_factory.mktemp(f"slo-{request.param}")
    model = root / "models" / MODEL
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CONFIG)
    (model / "1" / "model.py").write_text(MODEL_PY)
    extra = ("--workers", "2") if request.param == "workers" else ()
    yield from serve_until_stopped(ConvoyProcess(root / "models", root / "server.log", extra))


def payload(request_id: int) -> np.ndarray:
    return np.array([[request_id, -request_id, request_id * 7, 1]], dtype=np.int64)


async def call(client, module, request_id: int) -> tuple[str, str]:
    """("ok", "") with this request's own answer, ("rejected", message), or ("other", why)."""
    tensor = module.InferInput("IN", [1, 4], "INT64")
    tensor.set_data_from_numpy(payload(request_id))
    try:
        result = await client.infer(MODEL, [tensor], request_id=str(request_id))
    except InferenceServerException as exc:
        kind = "rejected" if str(exc.status()) in REJECTED else "other"
        return kind, f"{exc.status()} {exc.message()}"
    answer = result.as_numpy("OUT")
    if answer is None or not np.array_equal(answer, payload(request_id) * 3 + 1):
        return "other", f"wrong answer {answer!r}"
    return "ok", ""


async def burst(server) -> list[tuple[str, str]]:
    http = httpaio.InferenceServerClient(server.http_url, conn_limit=BURST)
    grpc = grpcaio.InferenceServerClient(server.grpc_url)
    try:
        # The cost curve is learned while serving: a few requests one at a time first.
        for request_id in range(4):
            assert await call(grpc, grpcaio, request_id) == ("ok", "")
        calls = [
            call(grpc, grpcaio, i) if i % 2 else call(http, httpaio, i) for i in range(100, 100 + BURST)
        ]
        return list(await asyncio.gather(*calls))
    finally:
        await http.close()
        await grpc.close()


def test_burst_past_the_objective_is_refused_with_resource_exhausted_and_counted(slo_server):
    outcomes = asyncio.run(burst(slo_server))
    kinds = [kind for kind, _ in outcomes]
    assert "other" not in kinds, [o for o in outcomes if o[0] == "other"][:5]
    refused = kinds.count("rejected")
    # 80 requests at once, ~12 ms for one row: far more than fits 100 ms on one instance.
    assert 0 < refused < BURST and kinds.count("ok") > 0
    for status in ("429", "StatusCode.RESOURCE_EXHAUSTED"):
        messages = [m for kind, m in outcomes if kind == "rejected" and m.startswith(status)]
        assert messages, f"no refusal over {status}"
        assert "latency objective (latency_slo_ms 100)" in messages[0]
    # Counted as rejections, like deadline rejections: statistics and metrics.
    for flavour in ("grpc", "http"):
        opened = open_protocol(flavour, slo_server)
        try:
            stats = next(opened).statistics(MODEL)["1"]
        finally:
            opened.close()
        assert stats["fail"] == refused
        assert stats["success"] == BURST + 4 - refused
    labels = {"model": MODEL, "version": "1"}
    assert metric_value(slo_server, "convoy_rejections_total", reason="latency_slo", **labels) == refused
    limit = metric_value(slo_server, "convoy_batch_size_limit", **labels)
    assert 1 <= limit <= 8
    # The plan is visible: objective, admission share, and the learned cost line (the model
    # sleeps 10 ms + 2 ms a row; the line also holds the server's own per-batch work).
    assert metric_value(slo_server, "convoy_latency_objective_seconds", **labels) == 0.1
    assert 0.5 <= metric_value(slo_server, "convoy_latency_admission_share", **labels) <= 1.0
    fixed = metric_value(slo_server, "convoy_batch_cost_seconds", part="fixed", **labels)
    per_row = metric_value(slo_server, "convoy_batch_cost_seconds", part="per_row", **labels)
    assert fixed > 0 and per_row >= 0 and fixed + 8 * per_row >= 0.02
    print(f"\nlatency objective: {BURST} at once, {refused} refused, planned batch size {limit:g}")
