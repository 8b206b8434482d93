"""Decoupled models: 0..N responses per request over gRPC ModelStreamInfer (with Triton's
triton_final_response), HTTP generate / generate_stream, unary refusals, and cancellation
reaching the model's is_cancelled()."""

from __future__ import annotations

import json
import queue
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from helpers import ConvoyProcess, serve_until_stopped
from prometheus_client.parser import text_string_to_metric_families
from python_backend_models import triton_repository
from tritonclient.utils import InferenceServerException

DEADLINE_S = 30


@pytest.fixture(scope="module", params=["single-process", "workers"])
def triton_server(request, tmp_path_factory):
    """Every test here runs against one process and against `--workers 2`, where each
    response crosses from the engine process to the front end that holds the stream."""
    root = tmp_path_factory.mktemp(f"decoupled-{request.param}")
    extra = ("--workers", "2") if request.param == "workers" else ()
    process = ConvoyProcess(triton_repository(root / "models"), root / "server.log", extra)
    yield from serve_until_stopped(process, "ready")


def repeat_input(values: list[int]):
    item = grpcclient.InferInput("IN", [len(values)], "INT32")
    item.set_data_from_numpy(np.array(values, dtype=np.int32))
    return item


def collect(client, count_final: int, **kwargs) -> list:
    """Stream responses until `count_final` finals (or errors) arrived."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for request in kwargs.pop("requests"):
            client.async_stream_infer(**request, **kwargs)
        got = []
        finals = 0
        deadline = time.monotonic() + DEADLINE_S
        while finals < count_final:
            result, error = answers.get(timeout=max(deadline - time.monotonic(), 0.1))
            got.append((result, error))
            if error is not None:
                finals += 1
                continue
            parameters = result.get_response().parameters
            if "triton_final_response" in parameters and parameters["triton_final_response"].bool_param:
                finals += 1
        return got
    finally:
        client.stop_stream()


def test_stream_sends_each_response_then_an_empty_final(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    got = collect(
        client,
        2,
        requests=[
            {"model_name": "tp_repeat", "inputs": [repeat_input([5, 6, 7])], "request_id": "a"},
            {"model_name": "tp_repeat", "inputs": [repeat_input([9])], "request_id": "b"},
        ],
        enable_empty_final_response=True,
    )
    client.close()
    by_id: dict[str, list] = {"a": [], "b": []}
    for result, error in got:
        assert error is None
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        values = (
            None
            if not response.outputs
            else (int(result.as_numpy("OUT")[0]), int(result.as_numpy("IDX")[0]))
        )
        by_id[response.id].append((values, final))
    assert by_id["a"] == [((5, 0), False), ((6, 1), False), ((7, 2), False), (None, True)]
    assert by_id["b"] == [((9, 0), False), (None, True)]


def test_stream_without_empty_final_sends_only_responses(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer("tp_repeat", [repeat_input([1, 2])], request_id="x")
    # A second request on the same stream whose answer follows the first one's responses.
    client.async_stream_infer("tp_repeat", [repeat_input([3])], request_id="y")
    seen = [answers.get(timeout=DEADLINE_S) for _ in range(3)]
    client.stop_stream()
    client.close()
    assert all(error is None for _, error in seen)
    assert sorted(int(r.as_numpy("OUT")[0]) for r, _ in seen) == [1, 2, 3]
    # Every streamed response says whether it is its request's last, as Triton's do; the model
    # sent its final flag alone, so none of these is.
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in seen]
    assert finals == [False, False, False]


def _parameters(result) -> dict:
    out = {}
    for key, value in result.get_response().parameters.items():
        out[key] = getattr(value, value.WhichOneof("parameter_choice"))
    return out


def test_streamed_responses_with_parameters_carry_the_final_flag_beside_them(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hello big world"], dtype=np.object_))
    got = collect(client, 1, requests=[{"model_name": "tp_words", "inputs": [text]}])
    client.close()
    assert [error for _, error in got] == [None, None, None]
    assert [_parameters(result) for result, _ in got] == [
        {"index": 0, "triton_final_response": False},
        {"index": 1, "triton_final_response": False},
        {"index": 2, "triton_final_response": True},
    ]


def _grpc_error_stream(triton_server, requests_: list[dict]) -> list:
    """Stream `requests_` with Triton's triton_grpc_error header; every callback until the
    stream ends (an error ends it)."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)),
        headers={"triton_grpc_error": "true"},
    )
    got = []
    try:
        for request in requests_:
            client.async_stream_infer(**request)
            got.append(answers.get(timeout=DEADLINE_S))
            if got[-1][1] is not None:
                break
    finally:
        client.stop_stream()
        client.close()
    return got


def test_triton_grpc_error_header_ends_the_stream_with_the_errors_status(triton_server):
    good = {
        "model_name": "tp_repeat",
        "inputs": [repeat_input([4])],
        "enable_empty_final_response": False,
    }
    got = _grpc_error_stream(
        triton_server, [good, {"model_name": "no_such_model", "inputs": [repeat_input([1])]}]
    )
    assert got[0][1] is None and int(got[0][0].as_numpy("OUT")[0]) == 4
    error = got[1][1]
    assert error is not None and got[1][0] is None
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in error.message()


def test_triton_grpc_error_header_ends_the_stream_on_a_model_error(triton_server):
    empty = grpcclient.InferInput("text_input", [1], "BYTES")
    empty.set_data_from_numpy(np.array([b""], dtype=np.object_))
    got = _grpc_error_stream(triton_server, [{"model_name": "tp_words", "inputs": [empty]}])
    (only,) = got
    assert only[0] is None
    assert only[1].message() == "text_input is empty"
    assert only[1].status() is not None and only[1].status() != "StatusCode.OK"


def test_without_the_header_a_stream_error_answers_that_request_only(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    got = collect(
        client,
        2,
        requests=[
            {"model_name": "no_such_model", "inputs": [repeat_input([1])]},
            {
                "model_name": "tp_repeat",
                "inputs": [repeat_input([8])],
                "enable_empty_final_response": True,
            },
        ],
    )
    client.close()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "no_such_model" in errors[0].message()
    values = [int(r.as_numpy("OUT")[0]) for r, e in got if e is None and r.as_numpy("OUT") is not None]
    assert values == [8]


def test_unary_model_infer_on_a_decoupled_model_is_refused(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("tp_repeat", [repeat_input([1])])
    assert caught.value.message() == (
        "ModelInfer RPC doesn't support models with decoupled transaction policy"
    )
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_http_infer_on_a_decoupled_model_is_refused(triton_server):
    body = {"inputs": [{"name": "IN", "datatype": "INT32", "shape": [1], "data": [1]}]}
    answer = requests.post(f"{triton_server.base_url}/v2/models/tp_repeat/infer", json=body, timeout=30)
    assert answer.status_code == 400
    assert "is decoupled" in answer.json()["error"]


def sse_events(response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
    return events


def test_generate_stream_sends_server_sent_events_as_the_model_responds(triton_server):
    with requests.post(
        f"{triton_server.base_url}/v2/models/tp_words/generate_stream",
        json={"text_input": "hello big world", "id": "g1"},
        stream=True,
        timeout=30,
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "text/event-stream"
        events = sse_events(answer)
    assert [e["text_output"] for e in events] == ["HELLO", "BIG", "WORLD"]
    assert [e["parameters"]["index"] for e in events] == [0, 1, 2]
    assert all(e["id"] == "g1" and e["model_name"] == "tp_words" for e in events)


def test_generate_stream_reports_a_model_error_as_an_event(triton_server):
    with requests.post(
        f"{triton_server.base_url}/v2/models/tp_words/generate_stream",
        json={"text_input": ""},
        stream=True,
        timeout=30,
    ) as answer:
        events = sse_events(answer)
    assert events == [{"error": "text_input is empty"}]


def test_generate_returns_one_response(triton_server):
    url = f"{triton_server.base_url}/v2/models"
    one = requests.post(f"{url}/tp_words/generate", json={"text_input": "solo"}, timeout=30)
    assert one.status_code == 200 and one.json()["text_output"] == "SOLO"
    many = requests.post(f"{url}/tp_words/generate", json={"text_input": "a b"}, timeout=30)
    assert many.status_code == 400 and "sent 2 responses" in many.json()["error"]
    plain = requests.post(f"{url}/tp_autocomplete/generate", json={"TEXT": "abc"}, timeout=30)
    assert plain.status_code == 200 and plain.json()["UPPER"] == "ABC"
    wrong = requests.post(f"{url}/tp_autocomplete/generate", json={"TXT": "abc"}, timeout=30)
    assert wrong.status_code == 400 and "['TXT'] are not inputs" in wrong.json()["error"]


def cancelled_count(triton_server) -> float:
    text = requests.get(f"http://127.0.0.1:{triton_server.metrics_port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "tp_repeat_cancelled":  # a counter: the parser names samples _total
            return sum(sample.value for sample in family.samples)
    return 0.0


def poll(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_http_disconnect_reaches_is_cancelled(triton_server):
    before = cancelled_count(triton_server)
    with requests.post(
        f"{triton_server.base_url}/v2/models/tp_repeat/generate_stream",
        json={"IN": [1], "parameters": {"until_cancelled": True}},
        stream=True,
        timeout=30,
    ) as answer:
        lines = answer.iter_lines()
        received = 0
        for line in lines:
            if line.startswith(b"data: "):
                received += 1
                if received == 3:
                    break
    poll(lambda: cancelled_count(triton_server) > before, "the model to see is_cancelled()")


def test_grpc_stream_cancel_reaches_is_cancelled(triton_server):
    before = cancelled_count(triton_server)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer("tp_repeat", [repeat_input([1])], parameters={"until_cancelled": True})
    for _ in range(3):
        _, error = answers.get(timeout=DEADLINE_S)
        assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    poll(lambda: cancelled_count(triton_server) > before, "the model to see is_cancelled()")
