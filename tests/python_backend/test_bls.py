"""BLS: model code calling other models of the server (exec, async_exec, exec(decoupled=True)),
through their schedulers; errors come back as response errors; a call no instance could ever run
(every instance of its model held by a call waiting on it) is refused, while a model may call
itself or its caller back as long as instances are left; decoupled iterators cancel; BLS
outside execute() is refused with Triton's text; model names may be bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient


def call(client, model: str, x: np.ndarray, mode: str | None = None):
    item = grpcclient.InferInput("X", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    return client.infer(model, [item], parameters={"mode": mode} if mode else None)


def test_exec_calls_another_model_and_gets_only_the_requested_output(grpc_client):
    before = grpc_client.get_inference_statistics("tp_add_sub", as_json=True)["model_stats"][0]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = call(grpc_client, "tp_bls", x, "add")
    np.testing.assert_array_equal(result.as_numpy("Y"), 2 * x)
    assert result.as_numpy("MSG")[0, 0] == b"OUTPUT0"
    after = grpc_client.get_inference_statistics("tp_add_sub", as_json=True)["model_stats"][0]
    # The call went through tp_add_sub's scheduler: it counts in that model's statistics.
    succeeded = int(after["inference_stats"]["success"].get("count", 0))
    assert succeeded == int(before["inference_stats"]["success"].get("count", 0)) + 1


def test_exec_decoupled_iterates_over_every_response_then_an_empty_final(grpc_client):
    x = np.array([[1, 2, 3, 4]], dtype=np.float32)
    result = call(grpc_client, "tp_bls", x, "stream")
    assert result.as_numpy("Y")[0, 0] == 10
    assert json.loads(result.as_numpy("MSG")[0, 0]) == {"responses": 5, "last_empty": True}


def test_async_exec_and_async_decoupled_exec(grpc_client):
    x = np.full((1, 4), 3, dtype=np.float32)
    y = call(grpc_client, "tp_bls_async", x).as_numpy("Y")
    np.testing.assert_array_equal(y[0, :3], [6, 6, 6])
    assert y[0, 3] == 3  # tp_repeat streamed three responses with outputs


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (
            "self",
            "BLS call from model 'tp_bls' to model 'tp_bls' refused: it could never run, since "
            "every instance of 'tp_bls' (1) is held by a BLS call waiting for this one (a "
            "deadlock); give it more instances (instance_group count), bound the recursion, or "
            "set a timeout on the request",
        ),
        (
            # tp_bls (one instance) waits on tp_pong, which calls tp_bls back.
            "pingpong",
            "BLS call from model 'tp_pong' to model 'tp_bls' refused: it could never run, since "
            "every instance of 'tp_bls' (1) is held by a BLS call waiting for this one (a "
            "deadlock); give it more instances (instance_group count), bound the recursion, or "
            "set a timeout on the request",
        ),
        ("missing", "Request for unknown model: 'no_such_model' is not found"),
        ("timeout", "BLS request to 'tp_slow' timed out"),
    ],
)
def test_a_failing_call_comes_back_as_a_response_error(grpc_client, mode, message):
    result = call(grpc_client, "tp_bls", np.zeros((1, 4), dtype=np.float32), mode)
    assert result.as_numpy("MSG")[0, 0].decode() == message


def recurse(client, depth: int, timeout_us: int = 0) -> tuple[int, str]:
    item = grpcclient.InferInput("DEPTH", [1], "INT32")
    item.set_data_from_numpy(np.array([depth], dtype=np.int32))
    result = client.infer("tp_recurse", [item], parameters={"timeout_us": timeout_us})
    return int(result.as_numpy("REACHED")[0]), result.as_numpy("MSG")[0].decode()


def test_a_model_may_call_itself_while_an_instance_is_left(grpc_client):
    # tp_recurse has 3 instances: two may wait on the next call, the third runs the last hop.
    assert recurse(grpc_client, 1) == (1, "")
    assert recurse(grpc_client, 2) == (2, "")


def test_recursion_deeper_than_the_instances_is_refused_at_the_call_that_would_deadlock(grpc_client):
    reached, message = recurse(grpc_client, 5)
    assert reached == 2  # the third hop found all three instances waiting
    assert message.startswith(
        "BLS call from model 'tp_recurse' to model 'tp_recurse' refused: it could never run, "
        "since every instance of 'tp_recurse' (3) is held by a BLS call waiting for this one"
    )


def test_calls_with_a_timeout_are_never_refused_they_time_out(grpc_client):
    # The third hop's call (1.5 s) queues behind three waiting instances and times out before
    # the outer ones (2 s, 2.5 s) do.
    reached, message = recurse(grpc_client, 5, timeout_us=500_000)
    assert reached == 2
    assert message == "BLS request to 'tp_recurse' timed out"


def test_concurrent_self_calls_share_the_instances_without_deadlock(grpc_client):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(lambda _: recurse(grpc_client, 1), range(12)))
    # Each either ran its hop or was refused at once (all instances waiting): none hung.
    for reached, message in outcomes:
        assert (reached, message) == (1, "") or "refused: it could never run" in message
    assert (1, "") in outcomes


def cancel_inputs(max_sum: int, ignore: bool):
    items = [
        grpcclient.InferInput("MAX_SUM", [1], "INT32"),
        grpcclient.InferInput("IGNORE_CANCEL", [1], "BOOL"),
    ]
    items[0].set_data_from_numpy(np.array([max_sum], dtype=np.int32))
    items[1].set_data_from_numpy(np.array([ignore], dtype=np.bool_))
    return items


@pytest.mark.parametrize("model", ["tp_bls_cancel", "tp_bls_cancel_async"])
def test_cancel_on_a_decoupled_bls_iterator_reaches_the_called_model(grpc_client, model):
    result = grpc_client.infer(model, cancel_inputs(5, False))
    assert bool(result.as_numpy("IS_CANCELLED")[0]) is True
    assert result.as_numpy("SUM")[0] >= 5
    assert result.as_numpy("COUNT")[0] < 50  # the stream stopped before its 50 responses


@pytest.mark.parametrize("model", ["tp_bls_cancel", "tp_bls_cancel_async"])
def test_a_model_may_ignore_the_cancellation_and_answer_on(grpc_client, model):
    result = grpc_client.infer(model, cancel_inputs(5, True))
    assert bool(result.as_numpy("IS_CANCELLED")[0]) is False
    assert result.as_numpy("COUNT")[0] == 50


def test_bls_outside_execute_is_refused_with_tritons_text_and_names_may_be_bytes(grpc_client):
    item = grpcclient.InferInput("NAME", [1], "BYTES")
    item.set_data_from_numpy(np.array([b"tp_add_sub"], dtype=np.object_))
    result = grpc_client.infer("tp_bls_lifecycle", [item])
    np.testing.assert_array_equal(result.as_numpy("Y"), [2, 4, 6, 8])
    assert result.as_numpy("MSG")[0] == b"BLS is only supported during the 'execute' function."
