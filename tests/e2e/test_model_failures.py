"""A model whose execute raises answers INTERNAL with the error's message; the server and the
model keep serving."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import WITH_WORKERS
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.frontends(*WITH_WORKERS)


def _send(protocol, values):
    tensor = protocol.input("INPUT0", np.array([values], dtype=np.int32), "INT32")
    return protocol.client.infer("fails_on_value", [tensor])


def test_execute_raising_returns_internal_with_its_message(protocol):
    with pytest.raises(InferenceServerException) as caught:
        _send(protocol, [1, 13, 2])
    assert caught.value.status() == protocol.status("INTERNAL")
    message = caught.value.message()
    assert "fails_on_value" in message
    assert "ValueError: refusing the value 13" in message
    assert "Traceback" not in message


def test_model_keeps_serving_after_execute_raised(protocol):
    with pytest.raises(InferenceServerException):
        _send(protocol, [13])
    assert protocol.client.is_model_ready("fails_on_value")
    np.testing.assert_array_equal(_send(protocol, [1, 2, 3]).as_numpy("OUTPUT0"), [[1, 2, 3]])
    assert protocol.client.is_server_ready()
