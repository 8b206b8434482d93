"""`async def execute` of a decoupled model: its coroutines overlap on one instance, as on
Triton (the next request starts while the previous one awaits); one that raises fails its
requests with the error and logs the traceback. A model that is not decoupled is awaited batch
by batch (tests/python_backend/test_triton_models.py::test_async_execute)."""

from __future__ import annotations

import queue

import numpy as np
import tritonclient.grpc as grpcclient
from helpers import poll

DEADLINE_S = 60


def inputs(role: str, key: str):
    items = [grpcclient.InferInput("ROLE", [1], "BYTES"), grpcclient.InferInput("KEY", [1], "BYTES")]
    items[0].set_data_from_numpy(np.array([role.encode()], dtype=np.object_))
    items[1].set_data_from_numpy(np.array([key.encode()], dtype=np.object_))
    return items


def stream(url: str, calls: list[tuple[str, str, str]]) -> dict[str, tuple]:
    """Send (request id, role, key) on one stream; request id -> (OUT or None, error or None)."""
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for request_id, role, key in calls:
            client.async_stream_infer("tp_async_decoupled", inputs(role, key), request_id=request_id)
        got: dict[str, tuple] = {}
        while len(got) < len(calls):
            result, error = answers.get(timeout=DEADLINE_S)
            if error is not None:
                # An error response of a stream names no request: there is one per test.
                got[f"error-{len(got)}"] = (None, error)
                continue
            request_id = result.get_response().id
            got[request_id] = (result.as_numpy("OUT")[0].decode(), None)
        return got
    finally:
        client.stop_stream()
        client.close()


def test_execute_coroutines_overlap_on_one_instance(triton_server):
    # The first request awaits an event only the second sets: it ends "released" only if the
    # second execute() ran while the first was awaiting, on the model's single instance.
    got = stream(
        triton_server.grpc_url,
        [("w1", "wait", "k1"), ("w2", "wait", "k1"), ("r", "release", "k1")],
    )
    assert got == {"w1": ("released", None), "w2": ("released", None), "r": ("done", None)}


def test_a_raising_coroutine_fails_its_request_and_logs_the_traceback(triton_server):
    got = stream(triton_server.grpc_url, [("x", "raise", "boom-key")])
    ((_, error),) = got.values()
    assert "ValueError: asked to raise for boom-key" in error.message()
    log = poll(
        lambda: (
            "ValueError: asked to raise for boom-key" in (text := triton_server.log_path.read_text())
            and text
        ),
        "the traceback in the server log",
    )
    assert "model 'tp_async_decoupled': execute() raised" in log
    assert "Traceback" in log
    # The instance keeps serving.
    assert stream(triton_server.grpc_url, [("r2", "release", "k2")]) == {"r2": ("done", None)}
