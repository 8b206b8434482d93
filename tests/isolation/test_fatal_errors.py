"""An error the runtime classifies as fatal (here: a type the Python model lists in
`fatal_errors`, standing for a CUDA device-side assert) fails its batch, and the model version
is reloaded with fresh instances; an ordinary exception fails only its batch."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ConvoyProcess, copy_model, open_protocol, poll, serve_until_stopped
from tritonclient.utils import InferenceServerException

MODEL = "fatal_error"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fatal")
    repository = root / "models"
    repository.mkdir()
    copy_model(repository, MODEL)
    yield from serve_until_stopped(ConvoyProcess(repository, root / "server.log"), "ready")


@pytest.fixture(params=["grpc", "http"])
def protocol(request, server):
    yield from open_protocol(request.param, server)


def send(protocol, value: int):
    tensor = protocol.input("INPUT0", np.array([[value, 1]], dtype=np.int32), "INT32")
    return protocol.client.infer(MODEL, [tensor])


def loaded_at(protocol) -> int:
    result = send(protocol, 1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), [[1, 1]])
    return int(result.as_numpy("LOADED_AT")[0, 0])


def test_fatal_error_fails_the_batch_and_reloads_the_model(protocol):
    poll(lambda: protocol.client.is_model_ready(MODEL), "the model to be ready")
    before = loaded_at(protocol)
    with pytest.raises(InferenceServerException) as raised:
        send(protocol, 99)
    assert raised.value.status() == protocol.status("INTERNAL")
    assert raised.value.message() == (
        f"model '{MODEL}' hit a fatal error (DeviceAssert: device-side assert triggered "
        "(simulated)); reloading it"
    )
    poll(lambda: protocol.client.is_model_ready(MODEL), "the reloaded model to be ready")
    assert loaded_at(protocol) != before  # a fresh instance: initialize ran again
    assert protocol.client.is_server_ready()
    stats = protocol.statistics(MODEL)["1"]
    assert stats["fail"] >= 1


def test_ordinary_error_fails_only_its_batch(protocol):
    poll(lambda: protocol.client.is_model_ready(MODEL), "the model to be ready")
    before = loaded_at(protocol)
    with pytest.raises(InferenceServerException) as raised:
        send(protocol, 13)
    assert raised.value.status() == protocol.status("INTERNAL")
    assert "ValueError: refusing the value 13" in raised.value.message()
    assert protocol.client.is_model_ready(MODEL)
    assert loaded_at(protocol) == before
