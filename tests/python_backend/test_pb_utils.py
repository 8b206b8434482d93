"""triton_python_backend_utils helpers that need no server: datatypes, BYTES serialisation,
Tensor checks, auto-complete setters and their conflicts, response checks, the module name."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from convoy.runtimes.triton_python import pb_utils
from convoy.runtimes.triton_python.adapter import install_module


def test_the_module_is_importable_under_tritons_name():
    install_module()
    module = importlib.import_module("triton_python_backend_utils")
    assert module is pb_utils


@pytest.mark.parametrize(
    ("config_name", "dtype", "code"),
    [
        ("TYPE_BOOL", np.bool_, 1),
        ("TYPE_UINT8", np.uint8, 2),
        ("TYPE_INT32", np.int32, 8),
        ("TYPE_INT64", np.int64, 9),
        ("TYPE_FP16", np.float16, 10),
        ("TYPE_FP32", np.float32, 11),
        ("TYPE_FP64", np.float64, 12),
        ("TYPE_STRING", np.object_, 13),
    ],
)
def test_datatype_converters_agree(config_name, dtype, code):
    assert pb_utils.triton_string_to_numpy(config_name) is dtype
    assert pb_utils.numpy_to_triton_type(dtype) == code
    assert pb_utils.triton_to_numpy_type(code) is dtype


def test_unknown_config_datatype_raises():
    with pytest.raises(pb_utils.TritonModelException, match="TYPE_NOPE"):
        pb_utils.triton_string_to_numpy("TYPE_NOPE")


def test_bytes_serialisation_round_trips():
    values = np.array([b"a", b"", "\u00e9t\u00e9", b"\x00\xff"], dtype=np.object_)
    encoded = pb_utils.serialize_byte_tensor(values)
    assert encoded.dtype == np.uint8
    assert encoded.tobytes()[:5] == b"\x01\x00\x00\x00a"
    decoded = pb_utils.deserialize_bytes_tensor(encoded)
    assert decoded.tolist() == [b"a", b"", "\u00e9t\u00e9".encode(), b"\x00\xff"]


def test_tensor_accessors_and_string_arrays_become_bytes_objects():
    tensor = pb_utils.Tensor("T", np.array([["x", "yz"]]))
    assert tensor.name() == "T" and tensor.shape() == [1, 2]
    assert tensor.as_numpy().dtype == np.object_
    assert tensor.triton_dtype() == pb_utils.TRITONSERVER_TYPE_BYTES
    floats = pb_utils.Tensor("F", np.ones(3, dtype=np.float32))
    assert floats.is_cpu()
    again = pb_utils.Tensor.from_dlpack("G", floats.as_numpy())
    np.testing.assert_array_equal(again.as_numpy(), floats.as_numpy())
    with pytest.raises(pb_utils.TritonModelException, match="complex64"):
        pb_utils.Tensor("C", np.ones(2, dtype=np.complex64))


def test_inference_response_checks_its_arguments():
    with pytest.raises(pb_utils.TritonModelException, match=r"pb_utils\.Tensor"):
        pb_utils.InferenceResponse([np.ones(2)])
    with pytest.raises(pb_utils.TritonModelException, match="TritonError"):
        pb_utils.InferenceResponse(error="boom")
    response = pb_utils.InferenceResponse(
        error=pb_utils.TritonError("bad", pb_utils.TritonError.INVALID_ARG), parameters={"k": 1}
    )
    assert response.has_error() and response.error().code() == pb_utils.TritonError.INVALID_ARG
    assert json.loads(response.parameters()) == {"k": 1}


def test_auto_complete_setters_fill_and_refuse_conflicts():
    config = pb_utils.ModelConfig(
        {
            "name": "m",
            "max_batch_size": 4,
            "input": [{"name": "A", "data_type": "TYPE_FP32", "dims": [2]}],
        }
    )
    config.add_input({"name": "A", "data_type": "TYPE_FP32", "dims": [2]})  # agrees: fine
    config.add_input({"name": "B", "data_type": "TYPE_INT32", "dims": [-1]})
    config.add_output({"name": "Y", "data_type": "TYPE_FP32", "dims": [2]})
    config.set_dynamic_batching()
    config.set_model_transaction_policy({"decoupled": True})
    config.set_max_batch_size(4)
    document = config.as_dict()
    assert [i["name"] for i in document["input"]] == ["A", "B"]
    assert document["dynamic_batching"] == {}
    assert pb_utils.using_decoupled_model_transaction_policy(document)
    assert pb_utils.get_output_config_by_name(document, "Y")["dims"] == [2]
    assert pb_utils.get_input_config_by_name(document, "Z") is None
    with pytest.raises(pb_utils.TritonModelException, match="conflicts"):
        config.add_input({"name": "A", "data_type": "TYPE_FP32", "dims": [3]})
    with pytest.raises(pb_utils.TritonModelException, match="max_batch_size 4"):
        config.set_max_batch_size(8)
    with pytest.raises(pb_utils.TritonModelException, match="needs data_type and dims"):
        config.add_output({"name": "Q"})
    with pytest.raises(pb_utils.TritonModelException, match="unknown keys"):
        config.set_model_transaction_policy({"streaming": True})


def test_bls_outside_a_server_says_why():
    request = pb_utils.InferenceRequest(
        model_name="x", inputs=[pb_utils.Tensor("A", np.ones(1))], requested_output_names=[]
    )
    saved = pb_utils._Binding.services
    pb_utils._Binding.services = None
    try:
        with pytest.raises(pb_utils.TritonModelException, match="BLS calls are not available"):
            request.exec()
    finally:
        pb_utils._Binding.services = saved
