"""Repository index, load and unload; a model that fails to load stays UNAVAILABLE with its
reason while the others serve."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import DATATYPES, WITH_WORKERS, Protocol, identity_model_name
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.frontends(*WITH_WORKERS)


def _index(protocol) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in protocol.repository_index():
        rows.setdefault(row["name"], []).append(row)
    return rows


def _infer_reloadable(protocol):
    tensor = protocol.input("INPUT0", np.array([[5, 6]], dtype=np.int32), "INT32")
    return protocol.client.infer("reloadable", [tensor])


def test_repository_index_lists_every_model_ready_with_its_versions(protocol):
    index = _index(protocol)
    expected = {"add_sub", "fixed_shape", "fails_on_value", "reloadable"}
    expected |= {identity_model_name(d) for d in DATATYPES}
    assert expected <= set(index)
    assert [(r["version"], r["state"]) for r in index["add_sub"]] == [("1", "READY")]
    assert [(r["version"], r["state"]) for r in index["versioned_all"]] == [
        ("1", "READY"),
        ("2", "READY"),
    ]
    assert [r["version"] for r in index["versioned_latest"]] == ["2"]


def test_unloaded_model_is_not_ready_and_refuses_inference_until_loaded_again(protocol):
    protocol.client.unload_model("reloadable")
    try:
        assert not protocol.client.is_model_ready("reloadable")
        with pytest.raises(InferenceServerException) as caught:
            _infer_reloadable(protocol)
        assert caught.value.status() in (
            protocol.status("NOT_FOUND"),
            protocol.status("UNAVAILABLE"),
        )
        assert "reloadable" in caught.value.message()
        (row,) = _index(protocol)["reloadable"]
        assert row["state"] != "READY"
    finally:
        protocol.client.load_model("reloadable")
    assert protocol.client.is_model_ready("reloadable")
    np.testing.assert_array_equal(_infer_reloadable(protocol).as_numpy("OUTPUT0"), [[5, 6]])
    assert protocol.client.is_server_ready()


def test_loading_a_loaded_model_again_keeps_it_serving(protocol):
    protocol.client.load_model("reloadable")
    assert protocol.client.is_model_ready("reloadable")
    np.testing.assert_array_equal(_infer_reloadable(protocol).as_numpy("OUTPUT0"), [[5, 6]])


def test_loading_a_model_absent_from_disk_fails_polling_as_in_triton(protocol):
    with pytest.raises(InferenceServerException) as caught:
        protocol.client.load_model("no_such_model")
    assert caught.value.status() == protocol.status("INTERNAL")
    assert caught.value.message().startswith(
        "failed to load 'no_such_model', failed to poll from model repository: "
    )


def test_unloading_an_unknown_model_returns_not_found(protocol):
    with pytest.raises(InferenceServerException) as caught:
        protocol.client.unload_model("no_such_model")
    assert caught.value.status() == protocol.status("NOT_FOUND")


# --- a repository holding models that fail to load ---------------------------------------------
@pytest.fixture(params=["grpc", "http"])
def broken(request, broken_server):
    if request.param == "grpc":
        client = grpcclient.InferenceServerClient(broken_server.grpc_url)
        yield Protocol("grpc", client, grpcclient)
    else:
        client = httpclient.InferenceServerClient(broken_server.http_url)
        yield Protocol("http", client, httpclient)
    client.close()


def test_other_models_serve_beside_a_model_that_failed_to_load(broken):
    assert broken.client.is_server_live()
    assert broken.client.is_model_ready("add_sub")
    a = np.ones((1, 16), dtype=np.float32)
    inputs = [broken.input("INPUT0", a, "FP32"), broken.input("INPUT1", a, "FP32")]
    result = broken.client.infer("add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)


def test_server_is_not_ready_while_a_model_failed_to_load(broken):
    assert not broken.client.is_server_ready()


def test_model_failing_on_import_is_unavailable_with_the_import_error(broken):
    assert not broken.client.is_model_ready("broken_import")
    (row,) = _index(broken)["broken_import"]
    assert row["state"] == "UNAVAILABLE"
    assert "model.py" in row["reason"]
    assert "RuntimeError: broken_import cannot be imported on purpose" in row["reason"]


def test_inference_on_a_model_that_failed_to_load_returns_unavailable_with_the_reason(broken):
    tensor = broken.input("INPUT0", np.ones((1, 4), dtype=np.float32), "FP32")
    with pytest.raises(InferenceServerException) as caught:
        broken.client.infer("broken_import", [tensor])
    assert caught.value.status() == broken.status("UNAVAILABLE")
    assert "cannot be imported on purpose" in caught.value.message()
    assert "Traceback" not in caught.value.message()


def test_model_with_invalid_config_is_unavailable_with_file_and_field_named(broken):
    assert not broken.client.is_model_ready("bad_config")
    (row,) = _index(broken)["bad_config"]
    assert row["state"] == "UNAVAILABLE"
    assert "bad_config/config.pbtxt" in row["reason"]
    assert "input[0].dims" in row["reason"]


def test_loading_a_model_that_fails_to_import_reports_the_reason(broken):
    with pytest.raises(InferenceServerException) as caught:
        broken.client.load_model("broken_import")
    # Triton's answer for a model that fails to load.
    assert caught.value.status() == broken.status("INVALID_ARGUMENT")
    assert caught.value.message().startswith("load failed for model 'broken_import': ")
    assert "cannot be imported on purpose" in caught.value.message()
    assert broken.client.is_model_ready("add_sub")


def test_startup_report_lists_each_model_state_and_reason(broken_server):
    lines = broken_server.stdout_lines
    assert "convoy: model add_sub v1 READY " in lines
    (reported,) = [line for line in lines if line.startswith("convoy: model broken_import ")]
    assert "UNAVAILABLE" in reported and "cannot be imported on purpose" in reported
    (reported,) = [line for line in lines if line.startswith("convoy: model bad_config ")]
    assert "UNAVAILABLE" in reported and "input[0].dims" in reported


def test_metadata_and_config_of_a_model_with_invalid_config_return_unavailable(broken):
    for call in (broken.model_metadata, broken.model_config):
        with pytest.raises(InferenceServerException) as caught:
            call("bad_config")
        assert caught.value.status() == broken.status("UNAVAILABLE")
        assert "input[0].dims" in caught.value.message()
