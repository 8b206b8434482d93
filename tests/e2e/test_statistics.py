"""The statistics API counts what known traffic did: rows (inference_count), batches
(execution_count), successes and failures."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import WITH_WORKERS
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.frontends(*WITH_WORKERS)


def _identity_int32(protocol, rows: int):
    tensor = protocol.input("INPUT0", np.arange(rows * 4, dtype=np.int32).reshape(rows, 4), "INT32")
    return protocol.client.infer("identity_int32", [tensor])


def test_counts_go_up_by_the_rows_and_requests_sent(protocol):
    before = protocol.statistics("identity_int32")["1"]
    for _ in range(3):
        _identity_int32(protocol, rows=2)
    after = protocol.statistics("identity_int32")["1"]
    # Sent one after another to a model without dynamic batching: one execution per request.
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["execution_count"] - before["execution_count"] == 3
    assert after["success"] - before["success"] == 3
    assert after["fail"] == before["fail"]


def test_failed_execution_counts_as_a_failure(protocol):
    before = protocol.statistics("fails_on_value")["1"]
    tensor = protocol.input("INPUT0", np.array([[13]], dtype=np.int32), "INT32")
    with pytest.raises(InferenceServerException):
        protocol.client.infer("fails_on_value", [tensor])
    after = protocol.statistics("fails_on_value")["1"]
    assert after["fail"] - before["fail"] == 1
    assert after["success"] == before["success"]


def test_statistics_without_a_model_name_cover_every_model(protocol):
    if protocol.name == "grpc":
        rows = protocol.client.get_inference_statistics(as_json=True)["model_stats"]
    else:
        rows = protocol.client.get_inference_statistics()["model_stats"]
    names = {row["name"] for row in rows}
    assert {"add_sub", "identity_int32", "fixed_shape", "versioned_all"} <= names


def test_statistics_of_unknown_model_return_not_found(protocol):
    with pytest.raises(InferenceServerException) as caught:
        protocol.statistics("no_such_model")
    assert caught.value.status() == protocol.status("NOT_FOUND")
