"""The pytorch backend on a CUDA device: KIND_GPU runs there, CUDA graph replay (padded up to its
bucket) equals eager execution, and a batch that runs out of memory is split. Skipped without
CUDA; imports nothing but torch, numpy and convoy so it runs on a bare GPU machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convoy.config import InstanceGroup, InstanceKind, ModelConfig, ModelVersionSource
from convoy.datatypes import bf16_bits_to_float32, float32_to_bf16_bits
from convoy.runtimes.pytorch import TorchRuntime
from convoy.types import TensorSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
]
RNG = np.random.default_rng(5)
ON_GPU = (InstanceGroup("g", 1, InstanceKind.GPU, (0,)),)


class Mlp(torch.nn.Module):
    """64 -> 256 -> 16, the shape DESIGN.md measures serving overhead with."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(64, 256)
        self.out = torch.nn.Linear(256, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Hungry(torch.nn.Module):
    """Needs 256 MiB of scratch per row; returns x * 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = x.new_zeros((x.shape[0], 64 * 1024 * 1024))
        return x * 2 + scratch.sum(dim=1, keepdim=True)


def _source(tmp_path: Path, name: str, module: torch.nn.Module, **config) -> ModelVersionSource:
    folder = tmp_path / name / "1"
    folder.mkdir(parents=True)
    torch.jit.script(module.eval()).save(str(folder / "model.pt"))
    fields = {"name": name, "backend": "pytorch", "instance_groups": ON_GPU, **config}
    return ModelVersionSource(ModelConfig(**fields), 1, folder)


def _mlp_source(tmp_path: Path, name: str, **config) -> ModelVersionSource:
    return _source(
        tmp_path,
        name,
        Mlp(),
        max_batch_size=12,
        inputs=(TensorSpec("x", "FP32", (64,)),),
        outputs=(TensorSpec("y", "FP32", (16,)),),
        **config,
    )


@pytest.fixture
def loaded():
    runtimes: list[TorchRuntime] = []

    def load(source: ModelVersionSource) -> TorchRuntime:
        runtime = TorchRuntime(source, 0)
        runtimes.append(runtime)
        runtime.load()
        return runtime

    yield load
    for runtime in runtimes:
        runtime.close()


def _mlp_on_cpu(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return Mlp()(torch.from_numpy(x)).numpy()


def test_kind_gpu_runs_on_its_gpu_with_a_graph_per_bucket(tmp_path, loaded):
    runtime = loaded(_mlp_source(tmp_path, "mlp"))
    assert runtime.device == torch.device("cuda", 0)
    assert runtime.graph_buckets == [1, 2, 4, 8, 12]
    x = RNG.standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_allclose(runtime.infer({"x": x})["y"], _mlp_on_cpu(x), rtol=1e-4, atol=1e-5)


def test_cuda_graph_replay_equals_eager_at_every_batch_size(tmp_path, loaded):
    graphs = loaded(_mlp_source(tmp_path, "graphs", parameters={"cuda_graphs": "true"}))
    eager = loaded(_mlp_source(tmp_path, "eager", parameters={"cuda_graphs": "false"}))
    assert graphs.graph_buckets and not eager.graph_buckets
    # Large batches first, so smaller ones replay over padding rows left from earlier batches.
    for rows in (12, 8, 3, 1, 5, 7, 2, 11):
        x = RNG.standard_normal((rows, 64)).astype(np.float32)
        replayed = graphs.infer({"x": x})["y"]
        assert replayed.shape == (rows, 16)
        np.testing.assert_allclose(replayed, eager.infer({"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_variable_dims_run_eagerly_without_graphs(tmp_path, loaded):
    runtime = loaded(
        _source(
            tmp_path,
            "double",
            Double(),
            max_batch_size=8,
            inputs=(TensorSpec("x", "FP32", (-1,)),),
            outputs=(TensorSpec("y", "FP32", (-1,)),),
        )
    )
    assert runtime.graph_buckets == []
    x = RNG.standard_normal((3, 7)).astype(np.float32)
    np.testing.assert_array_equal(runtime.infer({"x": x})["y"], x * 2)


def test_fp16_precision_with_graphs_stays_close_to_fp32(tmp_path, loaded):
    runtime = loaded(_mlp_source(tmp_path, "half", parameters={"precision": "fp16"}))
    x = RNG.standard_normal((6, 64)).astype(np.float32)
    outputs = runtime.infer({"x": x})["y"]
    assert outputs.dtype == np.float32
    np.testing.assert_allclose(outputs, _mlp_on_cpu(x), rtol=2e-2, atol=2e-2)


def test_bf16_tensors_replay_as_raw_bits(tmp_path, loaded):
    runtime = loaded(
        _source(
            tmp_path,
            "bf16",
            Double(),
            max_batch_size=4,
            inputs=(TensorSpec("x", "BF16", (2,)),),
            outputs=(TensorSpec("y", "BF16", (2,)),),
        )
    )
    values = np.array([[1.5, -3.0], [0.5, 8.0], [2.0, 0.0]], np.float32)
    outputs = runtime.infer({"x": float32_to_bf16_bits(values)})["y"]
    np.testing.assert_array_equal(bf16_bits_to_float32(outputs), values * 2)


def test_out_of_memory_splits_the_batch_and_lowers_the_instance_max_batch(tmp_path, loaded):
    runtime = loaded(
        _source(
            tmp_path,
            "hungry",
            Hungry(),
            max_batch_size=8,
            inputs=(TensorSpec("x", "FP32", (1,)),),
            outputs=(TensorSpec("y", "FP32", (1,)),),
            parameters={"cuda_graphs": "false"},
        )
    )
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    # Room for about 2.7 rows of scratch: batches of 8 and 4 run out of memory, 2 fit.
    budget = torch.cuda.memory_reserved(0) + 700 * 1024 * 1024
    torch.cuda.set_per_process_memory_fraction(budget / total, 0)
    try:
        x = np.arange(8, dtype=np.float32).reshape(8, 1)
        np.testing.assert_array_equal(runtime.infer({"x": x})["y"], x * 2)
        assert runtime.max_batch_rows == 2
        np.testing.assert_array_equal(runtime.infer({"x": x[:5]})["y"], x[:5] * 2)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
