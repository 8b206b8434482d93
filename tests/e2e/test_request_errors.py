"""Bad inference requests get the exact status and a message naming the culprit, over gRPC and
HTTP; none carries a traceback, and the server keeps serving afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from helpers import WITH_WORKERS, Protocol
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.frontends(*WITH_WORKERS)


def _vectors(rows: int = 1, width: int = 16) -> tuple[np.ndarray, np.ndarray]:
    a = np.arange(rows * width, dtype=np.float32).reshape(rows, width)
    return a, np.ones((rows, width), dtype=np.float32)


def _add_sub_inputs(protocol, rows: int = 1, binary: bool = True):
    a, b = _vectors(rows)
    return [
        protocol.input("INPUT0", a, "FP32", binary),
        protocol.input("INPUT1", b, "FP32", binary),
    ]


def _fails(protocol, status: str, *names: str, model="add_sub", inputs=None, **kwargs):
    """Run the request; assert its status, that the message names each of `names`, no traceback."""
    with pytest.raises(InferenceServerException) as caught:
        protocol.client.infer(model, inputs, **kwargs)
    error = caught.value
    assert error.status() == protocol.status(status), error
    message = error.message()
    for name in names:
        assert name in message, message
    assert "Traceback" not in message
    return message


def test_valid_request_computes_sum_and_difference(protocol):
    result = protocol.client.infer("add_sub", _add_sub_inputs(protocol, rows=3))
    a, b = _vectors(3)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_unknown_model_returns_not_found(protocol):
    _fails(
        protocol, "NOT_FOUND", "no_such_model", model="no_such_model", inputs=_add_sub_inputs(protocol)
    )


def test_unknown_input_name_returns_invalid_argument(protocol):
    a, b = _vectors()
    inputs = [protocol.input("INPUT0", a, "FP32"), protocol.input("INPUT9", b, "FP32")]
    _fails(protocol, "INVALID_ARGUMENT", "INPUT9", inputs=inputs)


def test_wrong_datatype_returns_invalid_argument(protocol):
    a, _ = _vectors()
    inputs = [
        protocol.input("INPUT0", a, "FP32"),
        protocol.input("INPUT1", a.astype(np.int32), "INT32"),
    ]
    message = _fails(protocol, "INVALID_ARGUMENT", "INPUT1", "FP32", "INT32", inputs=inputs)
    assert "datatype" in message


def test_wrong_shape_returns_invalid_argument(protocol):
    a = np.zeros((1, 15), dtype=np.float32)
    inputs = [protocol.input("INPUT0", a, "FP32"), protocol.input("INPUT1", a, "FP32")]
    _fails(protocol, "INVALID_ARGUMENT", "INPUT0", "15", inputs=inputs)


def test_shape_with_batch_dimension_on_non_batching_model_returns_invalid_argument(protocol):
    inputs = [protocol.input("INPUT0", np.zeros((1, 2, 3), dtype=np.float32), "FP32")]
    _fails(protocol, "INVALID_ARGUMENT", "INPUT0", "[2, 3]", model="fixed_shape", inputs=inputs)


def test_raw_bytes_shorter_than_shape_returns_invalid_argument(protocol):
    inputs = _add_sub_inputs(protocol)
    inputs[0].set_shape([2, 16])  # 64 bytes of data for a shape needing 128
    inputs[1].set_shape([2, 16])
    message = _fails(protocol, "INVALID_ARGUMENT", "INPUT0", inputs=inputs)
    assert "128" in message and "64" in message


def test_json_values_fewer_than_shape_returns_invalid_argument(http_client):
    protocol = Protocol("http", http_client, httpclient)
    inputs = _add_sub_inputs(protocol, binary=False)
    inputs[0].set_shape([2, 16])
    inputs[1].set_shape([2, 16])
    message = _fails(protocol, "INVALID_ARGUMENT", "INPUT0", inputs=inputs)
    assert "32" in message and "16" in message


def test_batch_over_max_batch_size_returns_invalid_argument(protocol):
    message = _fails(
        protocol, "INVALID_ARGUMENT", "INPUT0", "65", inputs=_add_sub_inputs(protocol, rows=65)
    )
    assert "max_batch_size" in message


def test_missing_required_input_returns_invalid_argument(protocol):
    inputs = _add_sub_inputs(protocol)[:1]
    _fails(protocol, "INVALID_ARGUMENT", "INPUT1", inputs=inputs)


def test_unknown_requested_output_returns_invalid_argument(protocol):
    outputs = [protocol.output("OUTPUT0"), protocol.output("OUTPUT9")]
    _fails(protocol, "INVALID_ARGUMENT", "OUTPUT9", inputs=_add_sub_inputs(protocol), outputs=outputs)


def test_inputs_with_different_batch_sizes_return_invalid_argument(protocol):
    a, _ = _vectors(2)
    _, b = _vectors(3)
    inputs = [protocol.input("INPUT0", a, "FP32"), protocol.input("INPUT1", b, "FP32")]
    _fails(protocol, "INVALID_ARGUMENT", "INPUT1", inputs=inputs)


def test_requested_output_subset_returns_only_that_output(protocol):
    result = protocol.client.infer(
        "add_sub", _add_sub_inputs(protocol), outputs=[protocol.output("OUTPUT1")]
    )
    a, b = _vectors()
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_server_still_serves_after_the_error_cases(protocol):
    assert protocol.client.is_server_ready()
    test_valid_request_computes_sum_and_difference(protocol)
