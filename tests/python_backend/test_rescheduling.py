"""Request rescheduling (`sequence_batching { iterative_sequence: true }` and
`request.set_release_flags(TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)`), as Triton's python backend
documents it: a request runs again in a later batch, beside new ones, until the model releases
it; decoupled models stream a response per run; a model without iterative_sequence is refused
the flag with Triton's text."""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def iterate(client, module, steps: int):
    item = module.InferInput("STEPS", [1, 1], "INT32")
    item.set_data_from_numpy(np.array([[steps]], dtype=np.int32))
    result = client.infer("tp_iterative", [item])
    return {
        name: int(result.as_numpy(name)[0, 0])
        for name in ("ITERATIONS", "MAX_BATCH", "CORRID", "STARTS")
    }


def test_a_rescheduled_request_runs_until_released(grpc_client, http_client):
    for client, module in ((grpc_client, grpcclient), (http_client, httpclient)):
        got = iterate(client, module, 4)
        assert got["ITERATIONS"] == 4
        assert got["STARTS"] == 1  # START (flag and control input) on the first run only
        assert got["CORRID"] > 0  # the batcher gave the request a sequence of its own


def test_new_and_rescheduled_requests_share_batches(grpc_client):
    steps = [1 + i % 6 for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda n: iterate(grpc_client, grpcclient, n), steps))
    for wanted, got in zip(steps, outcomes, strict=True):
        assert got["ITERATIONS"] == wanted
        assert got["STARTS"] == 1
    assert len({got["CORRID"] for got in outcomes}) == len(steps)
    # Continuous batching: runs of different requests (at different iterations) met in one call.
    assert max(got["MAX_BATCH"] for got in outcomes) > 1


def test_a_decoupled_model_streams_one_response_per_run(grpc_client):
    answers: queue.Queue = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        item = grpcclient.InferInput("IN", [1], "INT32")
        item.set_data_from_numpy(np.array([3], dtype=np.int32))
        grpc_client.async_stream_infer(
            "tp_iterative_decoupled", [item], enable_empty_final_response=True
        )
        got = []
        final = False
        while not final:
            result, error = answers.get(timeout=30)
            assert error is None, error
            if result.as_numpy("OUT") is not None:
                got.append(int(result.as_numpy("OUT")[0]))
            final = result.get_response().parameters["triton_final_response"].bool_param
    finally:
        grpc_client.stop_stream()
    assert got == [2, 1, 0]


def test_rescheduling_without_iterative_sequence_is_refused_with_tritons_text(grpc_client):
    item = grpcclient.InferInput("X", [1, 4], "FP32")
    item.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    result = grpc_client.infer("tp_features", [item], parameters={"mode": "reschedule"})
    assert result.as_numpy("MSG")[0, 0].decode() == (
        "Request is released with TRITONSERVER_REQUEST_RELEASE_RESCHEDULE, while the model is "
        "not configured to handle such a flag."
    )
