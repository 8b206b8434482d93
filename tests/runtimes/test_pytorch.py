"""The pytorch backend on model files written here from small torch modules (TorchScript by trace
and script, torch.export programs): in-process outputs equal the module's own, and a real
`convoy serve` serves them over tritonclient gRPC and HTTP. GPU behaviour: test_pytorch_gpu.py."""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ConvoyProcess, open_protocol, serve_until_stopped
from tritonclient.utils import InferenceServerException

from convoy.config import InstanceGroup, InstanceKind, ModelConfig, ModelVersionSource
from convoy.datatypes import bf16_bits_to_float32, float32_to_bf16_bits
from convoy.errors import InferenceFailed, ModelLoadFailed
from convoy.runtimes.pytorch import TorchRuntime
from convoy.types import TensorSpec

HAS_CUDA = torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present")
RNG = np.random.default_rng(11)
# TorchScript is deprecated in favour of torch.export from torch 2.10 on, and still supported.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


# --- modules ----------------------------------------------------------------------------------
class TwoHeads(torch.nn.Module):
    """x [16], y [1] -> (relu(linear(x)) [8], sum(x) * y [1]): a tuple, mapped in order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return torch.relu(self.linear(x)), x.sum(dim=1, keepdim=True) * y


class SumDiff(torch.nn.Module):
    """Named inputs, a dict of named outputs."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"SUM": a + b, "DIFF": a - b}


class Difference(torch.nn.Module):
    """Arguments in the opposite order to the config's inputs [a, b]: only names pick right."""

    def forward(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return a - b


class AddOneInPlace(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(1)


class Scale(torch.nn.Module):
    """Multiplies by a weight, so precision casts reach the module's parameters too."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class DtypeReport(torch.nn.Module):
    """1.0 per row when x arrives as float16, else 0.0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flag = 1.0 if x.dtype == torch.float16 else 0.0
        return torch.full((x.shape[0], 1), flag, dtype=x.dtype)


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Broken(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.ones(3, 3)


# --- model files ------------------------------------------------------------------------------
def trace(module: torch.nn.Module, *example: torch.Tensor):
    def write(path: Path) -> None:
        torch.jit.trace(module.eval(), example).save(str(path / "model.pt"))

    return write


def script(module: torch.nn.Module):
    def write(path: Path) -> None:
        torch.jit.script(module.eval()).save(str(path / "model.pt"))

    return write


def export(module: torch.nn.Module, *, dynamic_batch: bool = True, **example: torch.Tensor):
    """A torch.export program taking `example`'s names as keyword inputs."""

    def write(path: Path) -> None:
        dims = {name: {0: torch.export.Dim("batch", min=1, max=64)} for name in example}
        program = torch.export.export(
            module.eval(), (), example, dynamic_shapes=dims if dynamic_batch else None
        )
        torch.export.save(program, str(path / "model.pt2"))

    return write


def spec(name: str, datatype: str = "FP32", dims: tuple[int, ...] = (4,)) -> TensorSpec:
    return TensorSpec(name=name, datatype=datatype, dims=dims)


def two_heads_config(name: str = "m", **fields) -> dict:
    return {
        "name": name,
        "max_batch_size": 8,
        "inputs": (spec("INPUT__0", dims=(16,)), spec("INPUT__1", dims=(1,))),
        "outputs": (spec("OUTPUT__0", dims=(8,)), spec("OUTPUT__1", dims=(1,))),
        **fields,
    }


def _source(tmp_path: Path, writer, **config) -> ModelVersionSource:
    folder = tmp_path / config.get("name", "m") / "1"
    folder.mkdir(parents=True)
    writer(folder)
    fields = {"name": "m", "backend": "pytorch", **config}
    return ModelVersionSource(ModelConfig(**fields), 1, folder)


@pytest.fixture
def loaded():
    """Load a runtime (as the server does, on its own thread); close every one afterwards."""
    runtimes: list[TorchRuntime] = []

    def load(source: ModelVersionSource, instance_index: int = 0) -> TorchRuntime:
        runtime = TorchRuntime(source, instance_index)
        runtimes.append(runtime)
        runtime.load()
        return runtime

    yield load
    for runtime in runtimes:
        runtime.close()


def _torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy())


def _rows(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# --- in-process -------------------------------------------------------------------------------
def test_traced_torchscript_outputs_equal_the_module_outputs(tmp_path, loaded):
    module = TwoHeads()
    source = _source(
        tmp_path, trace(module, torch.zeros(2, 16), torch.zeros(2, 1)), **two_heads_config()
    )
    runtime = loaded(source)
    x, y = _rows(5, 16), _rows(5, 1)
    outputs = runtime.infer({"INPUT__0": x, "INPUT__1": y})
    with torch.no_grad():
        expected = module(_torch(x), _torch(y))
    assert runtime.device == torch.device("cpu")
    assert outputs["OUTPUT__0"].dtype == np.float32
    np.testing.assert_allclose(outputs["OUTPUT__0"], expected[0].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outputs["OUTPUT__1"], expected[1].numpy(), rtol=1e-6, atol=1e-6)


def test_exported_program_outputs_equal_the_module_outputs_at_every_batch_size(tmp_path, loaded):
    writer = export(SumDiff(), a=torch.zeros(4, 3), b=torch.zeros(4, 3))
    source = _source(
        tmp_path,
        writer,
        max_batch_size=64,
        inputs=(spec("a", dims=(3,)), spec("b", dims=(3,))),
        outputs=(spec("SUM", dims=(3,)), spec("DIFF", dims=(3,))),
    )
    runtime = loaded(source)
    for rows in (1, 2, 7, 64):
        a, b = _rows(rows, 3), _rows(rows, 3)
        outputs = runtime.infer({"a": a, "b": b})
        np.testing.assert_array_equal(outputs["SUM"], a + b)
        np.testing.assert_array_equal(outputs["DIFF"], a - b)


def test_forward_argument_names_pick_the_inputs_by_name(tmp_path, loaded):
    source = _source(
        tmp_path,
        script(Difference()),
        max_batch_size=4,
        inputs=(spec("a"), spec("b")),
        outputs=(spec("OUT"),),
    )
    a, b = _rows(2, 4), _rows(2, 4)
    np.testing.assert_array_equal(loaded(source).infer({"a": a, "b": b})["OUT"], a - b)


def test_inputs_go_by_position_when_the_names_differ(tmp_path, loaded):
    source = _source(
        tmp_path,
        script(Difference()),
        max_batch_size=4,
        inputs=(spec("INPUT__0"), spec("INPUT__1")),
        outputs=(spec("OUTPUT__0"),),
    )
    first, second = _rows(2, 4), _rows(2, 4)
    outputs = loaded(source).infer({"INPUT__0": first, "INPUT__1": second})
    # forward(b, a) returns a - b: the first config input landed in `b`.
    np.testing.assert_array_equal(outputs["OUTPUT__0"], second - first)


def test_fp16_precision_casts_module_and_inputs_and_returns_declared_fp32(tmp_path, loaded):
    report = _source(
        tmp_path,
        script(DtypeReport()),
        name="report",
        max_batch_size=4,
        inputs=(spec("x"),),
        outputs=(spec("seen_fp16", dims=(1,)),),
        parameters={"precision": "fp16"},
    )
    outputs = loaded(report).infer({"x": _rows(3, 4)})
    assert outputs["seen_fp16"].dtype == np.float32
    np.testing.assert_array_equal(outputs["seen_fp16"], np.ones((3, 1), np.float32))

    scale = _source(
        tmp_path,
        script(Scale()),
        name="scale",
        max_batch_size=4,
        inputs=(spec("x"),),
        outputs=(spec("y"),),
        parameters={"precision": "fp16"},
    )
    x = _rows(2, 4)
    np.testing.assert_allclose(loaded(scale).infer({"x": x})["y"], 3 * x, rtol=2e-3, atol=2e-3)


def test_bf16_tensors_travel_as_raw_bits(tmp_path, loaded):
    source = _source(
        tmp_path,
        script(Double()),
        max_batch_size=4,
        inputs=(spec("x", "BF16"),),
        outputs=(spec("y", "BF16"),),
    )
    values = np.array([[1.5, -2.0, 0.25, 3.0]], np.float32)
    outputs = loaded(source).infer({"x": float32_to_bf16_bits(values)})
    assert outputs["y"].dtype == np.uint16
    np.testing.assert_array_equal(bf16_bits_to_float32(outputs["y"]), values * 2)


def test_integer_tensors_pass_through_unchanged(tmp_path, loaded):
    source = _source(
        tmp_path,
        script(Double()),
        max_batch_size=4,
        inputs=(spec("x", "INT64"),),
        outputs=(spec("y", "INT64"),),
        parameters={"precision": "fp16"},
    )
    x = np.array([[2**40, -3, 0, 7]], np.int64)
    np.testing.assert_array_equal(loaded(source).infer({"x": x})["y"], x * 2)


def test_unbatched_model_receives_the_full_shape(tmp_path, loaded):
    source = _source(
        tmp_path,
        export(Double(), dynamic_batch=False, x=torch.zeros(2, 3)),
        inputs=(spec("x", dims=(2, 3)),),
        outputs=(spec("y", dims=(2, 3)),),
    )
    x = _rows(2, 3)
    np.testing.assert_array_equal(loaded(source).infer({"x": x})["y"], x * 2)


def test_in_place_module_never_writes_into_read_only_wire_bytes(tmp_path, loaded):
    source = _source(
        tmp_path, script(AddOneInPlace()), max_batch_size=4, inputs=(spec("x"),), outputs=(spec("y"),)
    )
    wire = np.zeros((1, 4), np.float32).tobytes()
    view = np.frombuffer(wire, dtype=np.float32).reshape(1, 4)
    outputs = loaded(source).infer({"x": view})
    np.testing.assert_array_equal(outputs["y"], np.ones((1, 4), np.float32))
    assert wire == bytes(16)


def test_output_of_another_kind_than_declared_fails_the_batch_naming_it(tmp_path, loaded):
    source = _source(
        tmp_path,
        script(Double()),
        max_batch_size=4,
        inputs=(spec("x", "INT32"),),
        outputs=(spec("y", "FP32"),),
    )
    with pytest.raises(InferenceFailed, match=r"output 'y'.*int32.*FP32"):
        loaded(source).infer({"x": np.ones((1, 4), np.int32)})


def test_fewer_outputs_than_declared_fails_the_batch(tmp_path, loaded):
    source = _source(
        tmp_path,
        script(Double()),
        max_batch_size=4,
        inputs=(spec("x"),),
        outputs=(spec("y"), spec("z")),
    )
    with pytest.raises(InferenceFailed, match=r"returned 1 tensor.*declares 2 outputs"):
        loaded(source).infer({"x": _rows(1, 4)})


def test_module_error_fails_the_batch_with_its_last_line(tmp_path, loaded):
    source = _source(
        tmp_path, script(Broken()), max_batch_size=4, inputs=(spec("x"),), outputs=(spec("y"),)
    )
    with pytest.raises(InferenceFailed) as caught:
        loaded(source).infer({"x": _rows(1, 4)})
    message = str(caught.value)
    assert "model 'm' failed to execute the batch: RuntimeError:" in message
    assert "cannot be multiplied" in message
    assert "Traceback" not in message


def test_pickled_module_is_refused_at_load(tmp_path, loaded):
    def write(path: Path) -> None:
        torch.save(Double(), path / "model.pt")

    source = _source(tmp_path, write, max_batch_size=4, inputs=(spec("x"),), outputs=(spec("y"),))
    with pytest.raises(ModelLoadFailed, match=r"not a TorchScript archive.*torch.save are not loaded"):
        loaded(source)


def test_missing_model_file_fails_load_naming_both_formats(tmp_path, loaded):
    source = _source(tmp_path, lambda path: None, inputs=(spec("x"),), outputs=(spec("y"),))
    with pytest.raises(ModelLoadFailed, match=r"model\.pt \(TorchScript\) or model\.pt2"):
        loaded(source)


def test_bytes_tensors_are_refused_at_load(tmp_path, loaded):
    source = _source(
        tmp_path,
        script(Double()),
        max_batch_size=4,
        inputs=(spec("x", "BYTES", (1,)),),
        outputs=(spec("y"),),
    )
    with pytest.raises(ModelLoadFailed, match="'x' is BYTES"):
        loaded(source)


@needs_no_cuda
def test_kind_gpu_without_cuda_fails_load_with_a_clear_reason(tmp_path, loaded):
    source = _source(
        tmp_path,
        script(Double()),
        max_batch_size=4,
        inputs=(spec("x"),),
        outputs=(spec("y"),),
        instance_groups=(InstanceGroup("g", 1, InstanceKind.GPU, (0,)),),
    )
    with pytest.raises(ModelLoadFailed, match=r"KIND_GPU .GPU 0. but .*no CUDA.*use KIND_CPU"):
        loaded(source)


def _threads_after_load(runtime: TorchRuntime) -> int:
    """torch's thread count on the thread that loaded the runtime (it is set per thread)."""
    seen: list[int] = []

    def work() -> None:
        runtime.load()
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    runtime.close()
    return seen[0]


def test_cpu_instances_share_the_cores_and_the_parameter_overrides(tmp_path):
    import os

    cores = len(os.sched_getaffinity(0))
    shared = _source(
        tmp_path,
        script(Double()),
        name="shared",
        inputs=(spec("x"),),
        outputs=(spec("y"),),
        instance_groups=(InstanceGroup("g", 2, InstanceKind.CPU),),
    )
    assert _threads_after_load(TorchRuntime(shared, 1)) == max(1, cores // 2)
    pinned = _source(
        tmp_path,
        script(Double()),
        name="pinned",
        inputs=(spec("x"),),
        outputs=(spec("y"),),
        parameters={"intra_op_thread_count": "3"},
    )
    assert _threads_after_load(TorchRuntime(pinned, 0)) == 3


@pytest.mark.parametrize(
    ("parameter", "value"),
    [("precision", "fp8"), ("cuda_graphs", "sometimes"), ("intra_op_thread_count", "0")],
)
def test_invalid_parameter_fails_load_naming_it(tmp_path, loaded, parameter, value):
    source = _source(
        tmp_path,
        script(Double()),
        inputs=(spec("x"),),
        outputs=(spec("y"),),
        parameters={parameter: value},
    )
    with pytest.raises(ModelLoadFailed, match=f"config.pbtxt: parameters.{parameter}: .*'{value}'"):
        loaded(source)


def test_cpu_instances_run_eagerly_even_when_cuda_graphs_are_asked_for(tmp_path, loaded):
    source = _source(
        tmp_path,
        script(Double()),
        max_batch_size=4,
        inputs=(spec("x"),),
        outputs=(spec("y"),),
        instance_groups=(InstanceGroup("g", 1, InstanceKind.CPU),),
        parameters={"cuda_graphs": "true"},
    )
    runtime = loaded(source)
    assert runtime.graph_buckets == []
    x = _rows(3, 4)
    np.testing.assert_array_equal(runtime.infer({"x": x})["y"], x * 2)


# --- served by a real server ----------------------------------------------------------------
TWO_HEADS = TwoHeads()


def _model(repository: Path, name: str, writer, config: str) -> None:
    folder = repository / name / "1"
    folder.mkdir(parents=True)
    writer(folder)
    (repository / name / "config.pbtxt").write_text(f'name: "{name}"\n{config}')


def build_torch_repository(repository: Path) -> Path:
    two_heads = """
        platform: "pytorch_libtorch"
        max_batch_size: 8
        input [ { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 16 ] },
                { name: "INPUT__1", data_type: TYPE_FP32, dims: [ 1 ] } ]
        output [ { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ 8 ] },
                 { name: "OUTPUT__1", data_type: TYPE_FP32, dims: [ 1 ] } ]
        dynamic_batching { max_queue_delay_microseconds: 1000 }
    """
    _model(
        repository,
        "two_heads",
        trace(TWO_HEADS, torch.zeros(2, 16), torch.zeros(2, 1)),
        two_heads + "instance_group [ { count: 2, kind: KIND_CPU } ]\n",
    )
    _model(
        repository,
        "sum_diff",
        export(SumDiff(), a=torch.zeros(4, 3), b=torch.zeros(4, 3)),
        """
        backend: "pytorch"
        max_batch_size: 16
        input [ { name: "a", data_type: TYPE_FP32, dims: [ 3 ] },
                { name: "b", data_type: TYPE_FP32, dims: [ 3 ] } ]
        output [ { name: "SUM", data_type: TYPE_FP32, dims: [ 3 ] },
                 { name: "DIFF", data_type: TYPE_FP32, dims: [ 3 ] } ]
        """,
    )
    _model(
        repository,
        "two_heads_gpu",
        trace(TWO_HEADS, torch.zeros(2, 16), torch.zeros(2, 1)),
        two_heads + "instance_group [ { count: 1, kind: KIND_GPU, gpus: [ 0 ] } ]\n",
    )
    return repository


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("pytorch")
    process = ConvoyProcess(build_torch_repository(root / "models"), root / "server.log")
    # two_heads_gpu cannot load without CUDA, and a model that failed keeps readiness false.
    yield from serve_until_stopped(process, "live")


@pytest.fixture(scope="module", params=["grpc", "http"])
def torch_protocol(request, torch_server):
    yield from open_protocol(request.param, torch_server)


def _two_heads_reference(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        first, second = TWO_HEADS(_torch(x), _torch(y))
    return first.numpy(), second.numpy()


def _two_heads_inputs(protocol, x: np.ndarray, y: np.ndarray) -> list:
    return [protocol.input("INPUT__0", x, "FP32"), protocol.input("INPUT__1", y, "FP32")]


def test_served_torchscript_outputs_equal_the_module_outputs(torch_protocol):
    x, y = _rows(3, 16), _rows(3, 1)
    result = torch_protocol.client.infer("two_heads", _two_heads_inputs(torch_protocol, x, y))
    expected = _two_heads_reference(x, y)
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), expected[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT__1"), expected[1], rtol=1e-6, atol=1e-6)


def test_served_exported_program_outputs_equal_the_module_outputs(torch_protocol):
    a, b = _rows(5, 3), _rows(5, 3)
    result = torch_protocol.client.infer(
        "sum_diff", [torch_protocol.input("a", a, "FP32"), torch_protocol.input("b", b, "FP32")]
    )
    np.testing.assert_array_equal(result.as_numpy("SUM"), a + b)
    np.testing.assert_array_equal(result.as_numpy("DIFF"), a - b)


def _infer_concurrently(protocol, model: str, requests: list[list]) -> list:
    """Send every request before waiting for any: gRPC by callback, HTTP by its gevent pool
    (tritonclient's HTTP client must stay on the thread that made it)."""
    if protocol.name == "http":
        pending = [protocol.client.async_infer(model, inputs) for inputs in requests]
        return [request.get_result() for request in pending]
    done = [threading.Event() for _ in requests]
    answers: list = [None] * len(requests)

    def callback(index, result, error):
        answers[index] = error or result
        done[index].set()

    for index, inputs in enumerate(requests):
        protocol.client.async_infer(model, inputs, partial(callback, index))
    for event in done:
        assert event.wait(timeout=60)
    return answers


def test_two_cpu_instances_answer_concurrent_requests_each_with_its_own_rows(
    torch_protocol, torch_server
):
    pairs = [(_rows(2, 16), _rows(2, 1)) for _ in range(24)]
    requests = [_two_heads_inputs(torch_protocol, x, y) for x, y in pairs]
    for (x, y), answer in zip(
        pairs, _infer_concurrently(torch_protocol, "two_heads", requests), strict=True
    ):
        assert not isinstance(answer, Exception), answer
        expected = _two_heads_reference(x, y)
        np.testing.assert_allclose(answer.as_numpy("OUTPUT__0"), expected[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(answer.as_numpy("OUTPUT__1"), expected[1], rtol=1e-6, atol=1e-6)
    log = torch_server.log()
    assert "model 'two_heads' instance 0: model.pt on cpu" in log
    assert "model 'two_heads' instance 1: model.pt on cpu" in log


@needs_no_cuda
def test_kind_gpu_without_cuda_is_unavailable_with_the_reason(torch_protocol):
    rows = {row["name"]: row for row in torch_protocol.repository_index()}
    row = rows["two_heads_gpu"]
    assert row["state"] == "UNAVAILABLE"
    assert "KIND_GPU" in row["reason"] and "CUDA" in row["reason"]
    assert not torch_protocol.client.is_model_ready("two_heads_gpu")
    with pytest.raises(InferenceServerException) as caught:
        torch_protocol.client.infer(
            "two_heads_gpu", _two_heads_inputs(torch_protocol, _rows(1, 16), _rows(1, 1))
        )
    assert caught.value.status() == torch_protocol.status("UNAVAILABLE")
    assert torch_protocol.client.is_model_ready("two_heads")
