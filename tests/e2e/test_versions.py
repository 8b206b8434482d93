"""Model versions: explicit versions reach that version, the policy decides what is served."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import WITH_WORKERS
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.frontends(*WITH_WORKERS)


def _plus_version(protocol, model: str, version: str = "") -> int:
    """versioned_* models add their version number to the input: send 100, get 100 + version."""
    tensor = protocol.input("INPUT0", np.array([[100]], dtype=np.int32), "INT32")
    result = protocol.client.infer(model, [tensor], model_version=version)
    return int(result.as_numpy("OUTPUT0")[0, 0]) - 100


def test_explicit_version_is_answered_by_that_version(protocol):
    assert _plus_version(protocol, "versioned_all", "1") == 1
    assert _plus_version(protocol, "versioned_all", "2") == 2


def test_no_version_is_answered_by_the_latest(protocol):
    assert _plus_version(protocol, "versioned_all") == 2
    assert _plus_version(protocol, "versioned_latest") == 2


def test_all_policy_serves_every_version(protocol):
    assert protocol.model_metadata("versioned_all")["versions"] == ["1", "2"]
    assert protocol.client.is_model_ready("versioned_all", "1")
    assert protocol.client.is_model_ready("versioned_all", "2")


def test_default_policy_serves_only_the_latest_version(protocol):
    assert protocol.model_metadata("versioned_latest")["versions"] == ["2"]
    assert protocol.client.is_model_ready("versioned_latest", "2")
    assert not protocol.client.is_model_ready("versioned_latest", "1")


def test_version_outside_the_policy_returns_not_found(protocol):
    with pytest.raises(InferenceServerException) as caught:
        _plus_version(protocol, "versioned_latest", "1")
    assert caught.value.status() == protocol.status("NOT_FOUND")
    assert "versioned_latest" in caught.value.message()


def test_unknown_version_returns_not_found(protocol):
    with pytest.raises(InferenceServerException) as caught:
        _plus_version(protocol, "versioned_all", "7")
    assert caught.value.status() == protocol.status("NOT_FOUND")
    assert "7" in caught.value.message()
    assert not protocol.client.is_model_ready("versioned_all", "7")


def test_unknown_version_metadata_returns_not_found(protocol):
    with pytest.raises(InferenceServerException) as caught:
        protocol.model_metadata("versioned_all", "7")
    assert caught.value.status() == protocol.status("NOT_FOUND")


def test_non_numeric_version_returns_invalid_argument(protocol):
    with pytest.raises(InferenceServerException) as caught:
        _plus_version(protocol, "versioned_all", "latest")
    assert caught.value.status() == protocol.status("INVALID_ARGUMENT")
    assert "latest" in caught.value.message()


def test_statistics_are_kept_per_version(protocol):
    before = protocol.statistics("versioned_all")
    _plus_version(protocol, "versioned_all", "1")
    after = protocol.statistics("versioned_all")
    assert set(after) == {"1", "2"}
    assert after["1"]["inference_count"] == before["1"]["inference_count"] + 1
    assert after["2"]["inference_count"] == before["2"]["inference_count"]
