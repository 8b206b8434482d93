"""The load generator's pure parts: payloads, checks, latency histogram, server metrics, replicas.

None of these modules imports locust, so they run inside pytest's process.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from convoy.loadtests.capacity import Slo, StepRow, client_bound_steps, recommend
from convoy.loadtests.charts import nice_ticks
from convoy.loadtests.checks import InferResponse, check_response, choose_oracle
from convoy.loadtests.errors import Rejected, RequestFailed, ResponseMismatch, from_client_error
from convoy.loadtests.metrics import MetricsSnapshot, ServerStepMetrics
from convoy.loadtests.payloads import ModelSpec, PayloadGenerator, PayloadOptions
from convoy.loadtests.stats import LatencyHistogram

ADD_SUB_METADATA = {
    "name": "add_sub",
    "inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]},
        {"name": "INPUT1", "datatype": "FP32", "shape": [-1, 16]},
    ],
    "outputs": [
        {"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 16]},
        {"name": "OUTPUT1", "datatype": "FP32", "shape": [-1, 16]},
    ],
}
TEXT_METADATA = {
    "name": "text_embedding",
    "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}],
    "outputs": [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, 384]}],
}


def add_sub_answer(inputs: dict, request_id: str = "r1") -> InferResponse:
    a, b = inputs["INPUT0"], inputs["INPUT1"]
    return InferResponse(request_id, "add_sub", {"OUTPUT0": ("FP32", a + b), "OUTPUT1": ("FP32", a - b)})


def test_payloads_follow_the_metadata_with_batch_and_variable_dimensions():
    model = ModelSpec.from_metadata(ADD_SUB_METADATA, {"max_batch_size": 64})
    inputs = PayloadGenerator(model, PayloadOptions(batch_size=3), seed=1).next()
    assert {k: (v.dtype, v.shape) for k, v in inputs.items()} == {
        "INPUT0": (np.float32, (3, 16)),
        "INPUT1": (np.float32, (3, 16)),
    }
    text = ModelSpec.from_metadata(TEXT_METADATA, None)
    sentences = PayloadGenerator(text, PayloadOptions(batch_size=2), seed=1).next()["TEXT"]
    assert sentences.shape == (2, 1) and all(isinstance(s, bytes) and s for s in sentences.ravel())


def test_a_correct_add_sub_answer_passes_every_check():
    model = ModelSpec.from_metadata(ADD_SUB_METADATA, {"max_batch_size": 64})
    inputs = PayloadGenerator(model, PayloadOptions(), seed=2).next()
    check_response(model, "r1", inputs, add_sub_answer(inputs), choose_oracle(model, "auto"))


def with_output(response: InferResponse, name: str, datatype: str, array) -> InferResponse:
    return InferResponse(response.id, response.model_name, {**response.outputs, name: (datatype, array)})


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda r: InferResponse("other", r.model_name, r.outputs), "echo id"),
        (lambda r: InferResponse(r.id, "add", r.outputs), "model_name"),
        (lambda r: InferResponse(r.id, r.model_name, {"OUTPUT0": r.outputs["OUTPUT0"]}), "outputs"),
        (lambda r: with_output(r, "OUTPUT1", "FP32", r.outputs["OUTPUT1"][1][:, :8]), "expected shape"),
        (lambda r: with_output(r, "OUTPUT1", "FP32", r.outputs["OUTPUT1"][1][:1]), "with batch 2"),
        (lambda r: with_output(r, "OUTPUT0", "FP32", r.outputs["OUTPUT0"][1] + 1), "values differ"),
        (lambda r: with_output(r, "OUTPUT1", "FP64", r.outputs["OUTPUT1"][1]), "FP64"),
    ],
)
def test_a_wrong_answer_raises_a_mismatch_naming_what_differs(spoil, message):
    model = ModelSpec.from_metadata(ADD_SUB_METADATA, {"max_batch_size": 64})
    inputs = PayloadGenerator(model, PayloadOptions(batch_size=2), seed=3).next()
    with pytest.raises(ResponseMismatch, match=message):
        check_response(model, "r1", inputs, spoil(add_sub_answer(inputs)), choose_oracle(model, "auto"))


def test_load_shedding_is_a_rejection_and_other_statuses_are_errors():
    assert isinstance(from_client_error("429", "queue full"), Rejected)
    assert isinstance(from_client_error("StatusCode.RESOURCE_EXHAUSTED", "full"), Rejected)
    assert isinstance(from_client_error(None, "model 'm' queue is full (8 requests)"), Rejected)
    assert isinstance(from_client_error("503", "unavailable"), RequestFailed)


def test_latency_histogram_percentiles_are_within_one_percent():
    values = np.random.default_rng(4).lognormal(0.5, 0.8, size=20_000)
    histogram = LatencyHistogram()
    for value in values:
        histogram.add(float(value))
    for q in (50, 90, 99):
        exact = float(np.percentile(values, q, method="inverted_cdf"))
        assert histogram.percentile(q) == pytest.approx(exact, rel=0.011)


TRITON_BEFORE = """
# TYPE nv_inference_count counter
nv_inference_count{model="add_sub",version="1"} 100
nv_inference_count{model="other",version="1"} 7
nv_inference_exec_count{model="add_sub",version="1"} 50
nv_inference_request_success{model="add_sub",version="1"} 100
nv_inference_queue_duration_us{model="add_sub",version="1"} 5000
convoy_batch_dispatch_total{model="add_sub",reason="full",version="1"} 10
"""
TRITON_AFTER = """
# TYPE nv_inference_count counter
nv_inference_count{model="add_sub",version="1"} 500
nv_inference_count{model="other",version="1"} 9
nv_inference_exec_count{model="add_sub",version="1"} 150
nv_inference_request_success{model="add_sub",version="1"} 500
nv_inference_queue_duration_us{model="add_sub",version="1"} 45000
nv_inference_pending_request_count{model="add_sub",version="1"} 3
convoy_batch_dispatch_total{model="add_sub",reason="full",version="1"} 60
convoy_batch_dispatch_total{model="add_sub",reason="delay_expired",version="1"} 40
nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5
nv_gpu_utilization{gpu_uuid="GPU-2"} 0.7
"""


def test_server_metrics_give_batch_size_queue_wait_and_dispatch_reasons_for_the_model():
    step = ServerStepMetrics.between(
        MetricsSnapshot.parse(TRITON_BEFORE), MetricsSnapshot.parse(TRITON_AFTER), "add_sub"
    )
    assert step.inferences == 400 and step.executions == 100
    assert step.mean_batch_size == 4.0
    assert step.mean_queue_us == 100.0
    assert step.pending_requests == 3
    assert step.gpu_utilization == pytest.approx(0.6)
    assert step.dispatch_reasons == {"delay_expired": 40, "full": 50}


def test_missing_metric_families_give_none_not_an_error():
    bare = MetricsSnapshot.parse("process_cpu_seconds_total 5.0\n")
    step = ServerStepMetrics.between(bare, bare, "add_sub")
    assert step.inferences is None and step.mean_batch_size is None and step.mean_queue_us is None
    assert ServerStepMetrics.between(None, bare, "add_sub").inferences is None


def row(step: int, rps: float, p99: float, errors: int = 0) -> StepRow:
    slo = Slo(p99_ms=10)
    meets = p99 <= slo.p99_ms and errors == 0
    return StepRow(
        step, 2**step, 1000, 1000 - errors, 0, 0, errors, 1.0, rps, p99 / 2, p99 / 1.5, p99, p99 / 2,
        p99, errors / 1000, 0.0, meets, 50.0, None, None, None, None, None, None,
    )  # fmt: skip


def test_replicas_come_from_the_fastest_step_meeting_the_slo_with_headroom():
    rows = [row(1, 900, 2), row(2, 1500, 6), row(3, 1700, 25), row(4, 1600, 4, errors=50)]
    rec = recommend(rows, Slo(10), target_rps=5000, headroom=0.3)
    assert rec.best_step == 2 and rec.per_replica_rps == 1500
    assert rec.replicas == 5  # 5000 / (1500 * 0.7) = 4.76
    none = recommend([row(1, 900, 50)], Slo(10), target_rps=5000, headroom=0.3)
    assert none.replicas is None and "no step met" in none.summary


def test_chart_ticks_cover_the_data():
    for high in (0.0, 1.06, 16, 120.8, 1539):
        ticks = nice_ticks(0, high)
        assert ticks[0] == 0 and ticks[-1] >= high


def cpu_row(step: int, users: int, rps: float, cpu: float) -> StepRow:
    return dataclasses.replace(row(step, rps, 2), users=users, client_cpu_percent=cpu)


def test_a_flat_step_with_the_client_near_its_limit_is_client_bound_and_gives_no_sizing():
    # The run: throughput flattened while the load generator sat at 86-88% CPU.
    rows = [cpu_row(1, 8, 1500, 60), cpu_row(2, 16, 2300, 86), cpu_row(3, 32, 2350, 88)]
    assert client_bound_steps(rows) == {3}
    rec = recommend(rows, Slo(10), target_rps=5000, headroom=0.3)
    assert rec.best_step == 3 and rec.client_bound == (3,)
    assert rec.replicas is None and rec.per_replica_rps is None
    assert rec.summary.startswith("client-bound") and "needs" not in rec.summary


def test_a_flat_step_with_the_client_idle_is_the_servers_limit():
    rows = [cpu_row(1, 8, 1500, 30), cpu_row(2, 16, 2300, 40), cpu_row(3, 32, 2350, 45)]
    assert client_bound_steps(rows) == set()
    rec = recommend(rows, Slo(10), target_rps=5000, headroom=0.3)
    assert rec.replicas == 4 and rec.client_bound == ()  # 5000 / (2350 * 0.7) = 3.04


def test_a_saturated_client_is_client_bound_even_while_throughput_grows():
    rows = [cpu_row(1, 8, 1000, 50), cpu_row(2, 16, 1900, 95)]
    assert client_bound_steps(rows) == {2}
    assert recommend(rows, Slo(10), target_rps=5000, headroom=0.3).replicas is None
