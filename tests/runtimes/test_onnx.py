"""The onnxruntime backend on real model.onnx files built here with onnx.helper: in-process
(outputs equal a numpy reference, config completion and its checks) and served by a real
`convoy serve` over tritonclient gRPC and HTTP."""

from __future__ import annotations

import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ConvoyProcess, open_protocol, serve_until_stopped
from onnx import TensorProto, helper, numpy_helper

from convoy.config import InstanceGroup, InstanceKind, ModelConfig, ModelVersionSource
from convoy.errors import InvalidConfig, InvalidInput, ModelLoadFailed
from convoy.runtimes.onnx import OnnxRuntime, cuda_device_count
from convoy.types import TensorSpec

HAS_CUDA = cuda_device_count() > 0
needs_no_cuda = pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present")

RNG = np.random.default_rng(7)
W1 = RNG.standard_normal((4, 8)).astype(np.float32)
B1 = RNG.standard_normal(8).astype(np.float32)
W2 = RNG.standard_normal((8, 3)).astype(np.float32)
B2 = RNG.standard_normal(3).astype(np.float32)


# --- model files ------------------------------------------------------------------------------
def _save(graph, path: Path, opset: int = 17) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def write_mlp(path: Path, batch_dim: str | int = "batch") -> None:
    """X [batch, 4] FP32 -> Gemm -> Relu -> Gemm -> Y [batch, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["X", "W1", "B1"], ["H"]),
            helper.make_node("Relu", ["H"], ["R"]),
            helper.make_node("Gemm", ["R", "W2", "B2"], ["Y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch_dim, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch_dim, 3])],
        initializer=[
            numpy_helper.from_array(W1, "W1"),
            numpy_helper.from_array(B1, "B1"),
            numpy_helper.from_array(W2, "W2"),
            numpy_helper.from_array(B2, "B2"),
        ],
    )
    _save(graph, path)


def mlp_reference(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ W1 + B1, 0) @ W2 + B2


def write_add_sub(path: Path) -> None:
    """INPUT0, INPUT1 [n] INT32 -> OUTPUT0 = sum, OUTPUT1 = difference."""
    vector = ["n"]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [helper.make_tensor_value_info(n, TensorProto.INT32, vector) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, TensorProto.INT32, vector) for n in ("OUTPUT0", "OUTPUT1")],
    )
    _save(graph, path)


def write_twice(path: Path) -> None:
    """TEXT [batch, 2] string -> TWICE = TEXT concatenated with itself."""
    graph = helper.make_graph(
        [helper.make_node("StringConcat", ["TEXT", "TEXT"], ["TWICE"])],
        "twice",
        [helper.make_tensor_value_info("TEXT", TensorProto.STRING, ["batch", 2])],
        [helper.make_tensor_value_info("TWICE", TensorProto.STRING, ["batch", 2])],
    )
    _save(graph, path, opset=20)


def write_bf16_identity(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "bf16",
        [helper.make_tensor_value_info("X", TensorProto.BFLOAT16, ["batch", 2])],
        [helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, ["batch", 2])],
    )
    _save(graph, path)


# --- in process ---------------------------------------------------------------------------------
def _source(tmp_path: Path, writer, name: str = "m", **config) -> ModelVersionSource:
    writer(tmp_path / name / "1" / "model.onnx")
    model_config = ModelConfig(name=name, backend="onnxruntime", **config)
    return ModelVersionSource(model_config, 1, tmp_path / name / "1")


def _loaded(source: ModelVersionSource, instance_index: int = 0) -> OnnxRuntime:
    runtime = OnnxRuntime(replace(source, config=OnnxRuntime.complete_config(source)), instance_index)
    runtime.load()
    return runtime


CPU_ONLY = (InstanceGroup("cpu", kind=InstanceKind.CPU),)


def test_mlp_outputs_equal_numpy_reference(tmp_path):
    runtime = _loaded(_source(tmp_path, write_mlp, max_batch_size=8, instance_groups=CPU_ONLY))
    for rows in (1, 5, 8):
        x = RNG.standard_normal((rows, 4)).astype(np.float32)
        outputs = runtime.infer({"X": x})
        assert set(outputs) == {"Y"}
        np.testing.assert_allclose(outputs["Y"], mlp_reference(x), rtol=1e-5, atol=1e-5)
    runtime.close()


def test_read_only_and_non_contiguous_inputs_are_accepted(tmp_path):
    runtime = _loaded(_source(tmp_path, write_mlp, max_batch_size=8, instance_groups=CPU_ONLY))
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    wire = np.frombuffer(x[:, :4].copy().tobytes(), dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(runtime.infer({"X": wire})["Y"], mlp_reference(wire), atol=1e-5)
    strided = x[:, ::2]
    np.testing.assert_allclose(runtime.infer({"X": strided})["Y"], mlp_reference(strided), atol=1e-5)


def test_add_sub_unbatched_returns_both_outputs(tmp_path):
    runtime = _loaded(_source(tmp_path, write_add_sub))
    a, b = np.array([1, 2, 3], np.int32), np.array([10, 20, 30], np.int32)
    outputs = runtime.infer({"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(outputs["OUTPUT0"], a + b)
    np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)


def test_string_tensors_travel_as_bytes(tmp_path):
    runtime = _loaded(_source(tmp_path, write_twice, max_batch_size=4))
    text = np.array([[b"ab", b"c\x00d"], ["grüß".encode(), b""]], dtype=object)
    twice = runtime.infer({"TEXT": text})["TWICE"]
    assert twice.dtype == object and twice.shape == (2, 2)
    assert twice.reshape(-1).tolist() == [b"abab", b"c\x00dc\x00d", "grüßgrüß".encode(), b""]


def test_non_utf8_string_input_is_rejected_as_invalid_input(tmp_path):
    runtime = _loaded(_source(tmp_path, write_twice, max_batch_size=4))
    with pytest.raises(InvalidInput, match=r"input 'TEXT': element 1 is not UTF-8"):
        runtime.infer({"TEXT": np.array([[b"ok", b"\xff"]], dtype=object)})


def test_complete_config_fills_dims_without_the_batch_dimension_when_batching(tmp_path):
    config = OnnxRuntime.complete_config(_source(tmp_path, write_mlp, max_batch_size=8))
    assert config.inputs == (TensorSpec("X", "FP32", (4,)),)
    assert config.outputs == (TensorSpec("Y", "FP32", (3,)),)
    assert config.max_batch_size == 8


def test_complete_config_keeps_full_dims_and_max_batch_size_zero(tmp_path):
    config = OnnxRuntime.complete_config(_source(tmp_path, write_mlp))
    assert config.max_batch_size == 0
    assert config.inputs == (TensorSpec("X", "FP32", (-1, 4)),)
    assert config.outputs == (TensorSpec("Y", "FP32", (-1, 3)),)


def test_complete_config_leaves_declared_tensors_alone(tmp_path):
    declared = (TensorSpec("X", "FP32", (-1,)),)
    config = OnnxRuntime.complete_config(_source(tmp_path, write_mlp, max_batch_size=8, inputs=declared))
    assert config.inputs == declared
    assert config.outputs == (TensorSpec("Y", "FP32", (3,)),)


@pytest.mark.parametrize(
    ("declared", "field", "message"),
    [
        (
            {"inputs": (TensorSpec("INPUT", "FP32", (4,)),)},
            "input[0].name",
            "'INPUT' is not an input of",
        ),
        (
            {"outputs": (TensorSpec("Z", "FP32", (3,)),)},
            "output[0].name",
            "'Z' is not an output of",
        ),
        (
            {"inputs": (TensorSpec("X", "INT64", (4,)),)},
            "input[0].data_type",
            "TYPE_INT64 but",
        ),
        (
            {"inputs": (TensorSpec("X", "FP32", (5,)),)},
            "input[0].dims",
            "[5] does not fit the shape [4]",
        ),
    ],
)
def test_declared_tensors_that_do_not_match_the_model_name_file_and_field(
    tmp_path, declared, field, message
):
    source = _source(tmp_path, write_mlp, max_batch_size=8, **declared)
    with pytest.raises(InvalidConfig) as caught:
        OnnxRuntime.complete_config(source)
    text = str(caught.value)
    assert f"m/config.pbtxt: {field}: " in text
    assert message in text
    assert "model.onnx" in text


def test_batching_a_model_whose_first_dimension_is_fixed_is_invalid(tmp_path):
    source = _source(tmp_path, lambda p: write_mlp(p, batch_dim=2), max_batch_size=8)
    with pytest.raises(InvalidConfig, match="first dimension is not variable"):
        OnnxRuntime.complete_config(source)


def test_bfloat16_inputs_are_refused_at_load(tmp_path):
    source = _source(tmp_path, write_bf16_identity, max_batch_size=4)
    with pytest.raises(ModelLoadFailed, match="'X' is bfloat16"):
        _loaded(source)


def test_missing_model_file_fails_load_naming_the_file(tmp_path):
    source = _source(tmp_path, write_mlp, max_batch_size=4, default_model_filename="other.onnx")
    with pytest.raises(ModelLoadFailed, match=r"other\.onnx: onnxruntime backend needs this file"):
        OnnxRuntime(source, 0).load()


def test_thread_count_parameter_must_be_a_positive_integer(tmp_path):
    source = _source(tmp_path, write_mlp, max_batch_size=4, parameters={"intra_op_thread_count": "many"})
    with pytest.raises(InvalidConfig, match=r"parameters\[intra_op_thread_count\]"):
        _loaded(source)


def test_thread_count_parameter_is_honoured(tmp_path):
    source = _source(
        tmp_path,
        write_mlp,
        max_batch_size=4,
        instance_groups=CPU_ONLY,
        parameters={"intra_op_thread_count": "1", "inter_op_thread_count": "1"},
    )
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(_loaded(source).infer({"X": x})["Y"], mlp_reference(x), atol=1e-5)


@needs_no_cuda
def test_kind_gpu_without_cuda_fails_load_with_a_clear_reason(tmp_path):
    gpu = (InstanceGroup("gpu", kind=InstanceKind.GPU, gpus=(0,)),)
    source = _source(tmp_path, write_mlp, max_batch_size=4, instance_groups=gpu)
    with pytest.raises(ModelLoadFailed, match=r"KIND_GPU.*CUDAExecutionProvider"):
        _loaded(source)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_kind_gpu_runs_the_mlp_on_cuda(tmp_path):
    gpu = (InstanceGroup("gpu", count=2, kind=InstanceKind.GPU, gpus=(0,)),)
    source = _source(tmp_path, write_mlp, max_batch_size=64, instance_groups=gpu)
    for index in range(2):
        runtime = _loaded(source, index)
        x = RNG.standard_normal((64, 4)).astype(np.float32)
        # CUDA runs FP32 matrix products in TF32 (onnxruntime's default): ~1e-3 relative error.
        np.testing.assert_allclose(runtime.infer({"X": x})["Y"], mlp_reference(x), atol=3e-2)
        runtime.close()


# --- served -----------------------------------------------------------------------------------
def _model(repository: Path, name: str, writer, config: str) -> None:
    writer(repository / name / "1" / "model.onnx")
    (repository / name / "config.pbtxt").write_text(f'name: "{name}"\n{config}')


def build_onnx_repository(repository: Path) -> Path:
    # Only name, backend and max_batch_size: inputs/outputs come from the graph.
    _model(
        repository,
        "mlp",
        write_mlp,
        'backend: "onnxruntime"\nmax_batch_size: 8\n'
        "dynamic_batching { max_queue_delay_microseconds: 500 }\n"
        "instance_group [ { count: 2, kind: KIND_CPU } ]\n"
        'model_warmup [ { name: "rand", batch_size: 2, inputs { key: "X" value: '
        "{ data_type: TYPE_FP32, dims: [ 4 ], random_data: true } } } ]\n",
    )
    _model(repository, "add_sub", write_add_sub, 'platform: "onnxruntime_onnx"\n')
    _model(repository, "twice", write_twice, 'backend: "onnxruntime"\nmax_batch_size: 4\n')
    _model(
        repository,
        "mlp_gpu",
        write_mlp,
        'backend: "onnxruntime"\nmax_batch_size: 8\ninstance_group [ { kind: KIND_GPU } ]\n',
    )
    _model(
        repository,
        "mlp_misdeclared",
        write_mlp,
        'backend: "onnxruntime"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT", data_type: TYPE_FP32, dims: [ 4 ] } ]\n',
    )
    return repository


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    process = ConvoyProcess(build_onnx_repository(root / "models"), root / "server.log")
    # mlp_gpu cannot load without CUDA, and a model that failed keeps readiness false.
    yield from serve_until_stopped(process, "live")


@pytest.fixture(scope="module", params=["grpc", "http"])
def onnx_protocol(request, onnx_server):
    yield from open_protocol(request.param, onnx_server)


def _index(protocol) -> dict[str, dict]:
    return {row["name"]: row for row in protocol.repository_index()}


def test_autocompleted_config_lists_the_graph_inputs_and_outputs(onnx_protocol):
    config = onnx_protocol.model_config("mlp")
    assert int(config["max_batch_size"]) == 8
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]] == [
        ("X", "TYPE_FP32", [4])
    ]
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["output"]] == [
        ("Y", "TYPE_FP32", [3])
    ]
    add_sub = onnx_protocol.model_config("add_sub")
    assert [t["name"] for t in add_sub["input"]] == ["INPUT0", "INPUT1"]
    assert [int(d) for d in add_sub["output"][1]["dims"]] == [-1]


def test_served_mlp_matches_numpy_reference(onnx_protocol):
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    result = onnx_protocol.client.infer(
        "mlp", [onnx_protocol.input("X", x, "FP32")], outputs=[onnx_protocol.output("Y")]
    )
    np.testing.assert_allclose(result.as_numpy("Y"), mlp_reference(x), rtol=1e-5, atol=1e-5)


def test_served_add_sub_from_platform_onnxruntime_onnx(onnx_protocol):
    a, b = np.array([5, 6, 7], np.int32), np.array([1, 1, 2], np.int32)
    result = onnx_protocol.client.infer(
        "add_sub",
        [onnx_protocol.input("INPUT0", a, "INT32"), onnx_protocol.input("INPUT1", b, "INT32")],
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_served_string_model_round_trips_bytes(onnx_protocol):
    text = np.array([[b"ab", "grüß".encode()]], dtype=object)
    result = onnx_protocol.client.infer("twice", [onnx_protocol.input("TEXT", text, "BYTES")])
    assert result.as_numpy("TWICE").reshape(-1).tolist() == [b"abab", "grüßgrüß".encode()]


def _infer_concurrently(protocol, model: str, tensors: list) -> list:
    """Send every request before waiting for any: gRPC by callback, HTTP by its gevent pool
    (tritonclient's HTTP client must stay on the thread that made it)."""
    if protocol.name == "http":
        pending = [protocol.client.async_infer(model, [tensor]) for tensor in tensors]
        return [request.get_result() for request in pending]
    done = [threading.Event() for _ in tensors]
    answers: list = [None] * len(tensors)

    def callback(index, result, error):
        answers[index] = error or result
        done[index].set()

    for index, tensor in enumerate(tensors):
        protocol.client.async_infer(model, [tensor], partial(callback, index))
    for event in done:
        assert event.wait(timeout=60)
    return answers


def test_two_cpu_instances_execute_concurrent_requests(onnx_protocol):
    before = onnx_protocol.statistics("mlp")["1"]
    inputs = [RNG.standard_normal((2, 4)).astype(np.float32) for _ in range(24)]
    tensors = [onnx_protocol.input("X", x, "FP32") for x in inputs]
    for x, answer in zip(inputs, _infer_concurrently(onnx_protocol, "mlp", tensors), strict=True):
        np.testing.assert_allclose(answer.as_numpy("Y"), mlp_reference(x), rtol=1e-5, atol=1e-5)
    after = onnx_protocol.statistics("mlp")["1"]
    assert after["inference_count"] - before["inference_count"] == 2 * len(inputs)
    assert after["success"] - before["success"] == len(inputs)
    assert 1 <= after["execution_count"] - before["execution_count"] <= len(inputs)


@needs_no_cuda
def test_kind_gpu_without_cuda_is_unavailable_with_the_reason(onnx_protocol):
    row = _index(onnx_protocol)["mlp_gpu"]
    assert row["state"] == "UNAVAILABLE"
    assert "KIND_GPU" in row["reason"]
    assert "CUDAExecutionProvider" in row["reason"]
    assert not onnx_protocol.client.is_model_ready("mlp_gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_kind_gpu_model_serves_on_cuda(onnx_protocol):
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    result = onnx_protocol.client.infer("mlp_gpu", [onnx_protocol.input("X", x, "FP32")])
    np.testing.assert_allclose(result.as_numpy("Y"), mlp_reference(x), atol=3e-2)  # TF32


def test_config_declaring_an_unknown_input_is_unavailable_naming_the_field(onnx_protocol):
    row = _index(onnx_protocol)["mlp_misdeclared"]
    assert row["state"] == "UNAVAILABLE"
    assert "mlp_misdeclared/config.pbtxt: input[0].name: 'INPUT' is not an input" in row["reason"]
