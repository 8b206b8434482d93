"""Benchmark workloads: a model repository entry plus the same model callable in-process.

Each workload writes its model into a repository folder and returns a `raw(batch)` function
that runs exactly what the server runs, so served and raw throughput compare like with like.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MLP_MODEL = '''
"""64 -> 256 -> 256 -> 16 MLP with ReLU, float32, numpy (weights written beside it)."""

from pathlib import Path

import numpy as np


class Model:
    def initialize(self, config):
        weights = np.load(Path(config["path"]) / "weights.npz")
        self.layers = [(weights[f"w{i}"], weights[f"b{i}"]) for i in range(3)]

    def execute(self, inputs):
        x = inputs["INPUT0"]
        for index, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if index < 2:
                np.maximum(x, 0, out=x)
        return {"OUTPUT0": x}
'''

#: The mlp workload's batching, which the peers (bench/peers/) are configured with too.
MLP_MAX_BATCH_SIZE = 256
MLP_MAX_QUEUE_DELAY_US = 2000

MLP_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 64 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
"""


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    #: perf_analyzer --shape arguments (empty when the config's dims are static)
    shapes: tuple[str, ...]
    #: Best batch size for the raw in-process measurement.
    raw_batch: int
    build: Callable[[Path], Callable[[int], None]]
    #: Extra perf_analyzer arguments (e.g. string data for BYTES inputs).
    perf_args: tuple[str, ...] = ()


def load_runtime(repository: Path, name: str):
    """The model as the server runs it: the same config parsing and backend, in-process."""
    from convoy.config import ModelVersionSource
    from convoy.engine.model_config import build_model_config, read_config_proto
    from convoy.runtimes.base import runtime_factory

    model_dir = repository / name
    config = build_model_config(read_config_proto(model_dir / "config.pbtxt"), model_dir)
    source = ModelVersionSource(config, 1, model_dir / "1")
    factory = runtime_factory(config.backend)
    source = ModelVersionSource(factory.complete_config(source), 1, model_dir / "1")
    runtime = factory(source, 0)
    runtime.load()
    return runtime


def mlp_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for i, (fan_in, fan_out) in enumerate([(64, 256), (256, 256), (256, 16)]):
        arrays[f"w{i}"] = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        arrays[f"b{i}"] = np.zeros(fan_out, dtype=np.float32)
    return arrays


def mlp_weights_path(repository: Path, name: str = "mlp") -> Path:
    """Where build_mlp writes the weights; the peers load this same file."""
    return repository / name / "1" / "weights.npz"


def _random_rows(runtime, name: str):
    rng = np.random.default_rng(1)

    def raw(batch: int) -> None:
        runtime.infer({name: rng.standard_normal((batch, 64)).astype(np.float32)})

    return raw


def build_mlp(repository: Path, name: str = "mlp") -> Callable[[int], None]:
    version = repository / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    config = MLP_CONFIG.format(
        name=name, max_batch_size=MLP_MAX_BATCH_SIZE, max_queue_delay_us=MLP_MAX_QUEUE_DELAY_US
    )
    (repository / name / "config.pbtxt").write_text(config)
    (version / "model.py").write_text(MLP_MODEL)
    np.savez(mlp_weights_path(repository, name), **mlp_weights())
    return _random_rows(load_runtime(repository, name), "INPUT0")


ONNX_MLP_CONFIG = """
name: "{name}"
backend: "onnxruntime"
max_batch_size: 256
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
"""


def build_onnx_mlp(repository: Path, name: str = "onnx_mlp") -> Callable[[int], None]:
    """The same MLP as an ONNX graph (Gemm/Relu); inputs and outputs come from autocomplete."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = mlp_weights()
    nodes, current = [], "INPUT0"
    for i in range(3):
        out = "OUTPUT0" if i == 2 else f"h{i}"
        gemm = out if i == 2 else f"g{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [gemm]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [gemm], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 16])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version = repository / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    onnx.save(model, version / "model.onnx")
    (repository / name / "config.pbtxt").write_text(ONNX_MLP_CONFIG.format(name=name))
    return _random_rows(load_runtime(repository, name), "INPUT0")


TORCH_MLP_CONFIG = """
name: "{name}"
backend: "pytorch"
max_batch_size: 256
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 64 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
"""


def build_torch_mlp(repository: Path, name: str = "torch_mlp") -> Callable[[int], None]:
    """The same MLP as TorchScript."""
    import torch

    weights = mlp_weights()
    layers = []
    for i in range(3):
        linear = torch.nn.Linear(*weights[f"w{i}"].shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weights[f"w{i}"].T.copy()))
            linear.bias.copy_(torch.from_numpy(weights[f"b{i}"]))
        layers.append(linear)
        if i < 2:
            layers.append(torch.nn.ReLU())
    module = torch.jit.script(torch.nn.Sequential(*layers).eval())
    version = repository / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    module.save(str(version / "model.pt"))
    (repository / name / "config.pbtxt").write_text(TORCH_MLP_CONFIG.format(name=name))
    return _random_rows(load_runtime(repository, name), "INPUT0")


SENTENCES = [
    b"Convoy batches requests from many clients into one forward pass.",
    b"The weather in the mountains changed quickly that afternoon.",
    b"A small team measured their service before they shipped it.",
    b"Embeddings place similar sentences close together.",
]


def build_text_embedding(repository: Path, name: str = "text_embedding") -> Callable[[int], None]:
    """The bundled all-MiniLM-L6-v2 demo model (python backend on torch), one sentence a request."""
    import shutil

    from convoy.cli import demo_repository

    shutil.copytree(demo_repository() / "text_embedding", repository / name)
    runtime = load_runtime(repository, name)

    def raw(batch: int) -> None:
        texts = np.array([SENTENCES[i % len(SENTENCES)] for i in range(batch)], dtype=object)
        runtime.infer({"TEXT": texts.reshape(batch, 1)})

    return raw


BERT_CONFIG = """
name: "{name}"
backend: "pytorch"
max_batch_size: 256
input [ {{ name: "INPUT_IDS", data_type: TYPE_INT64, dims: [ 128 ] }} ]
output [ {{ name: "POOLED", data_type: TYPE_FP32, dims: [ 768 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [ {{ count: 1, kind: KIND_GPU }} ]
parameters {{ key: "precision" value: {{ string_value: "fp16" }} }}
parameters {{ key: "cuda_graphs" value: {{ string_value: "true" }} }}
"""


def build_bert_base(repository: Path, name: str = "bert_base") -> Callable[[int], None]:
    """A BERT-base-shaped encoder (12 layers, hidden 768, 12 heads, seq 128) with random
    weights, TorchScript, fp16 on the GPU with CUDA graphs: token ids in, mean-pooled vector out."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(30522, 768)
            self.position = torch.nn.Parameter(torch.randn(1, 128, 768) * 0.02)
            layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True, activation="gelu")
            self.encoder = torch.nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(self.embed(input_ids) + self.position)
            return hidden.mean(dim=1)

    torch.manual_seed(0)
    module = torch.jit.script(Encoder().eval())
    version = repository / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    module.save(str(version / "model.pt"))
    (repository / name / "config.pbtxt").write_text(BERT_CONFIG.format(name=name))
    runtime = load_runtime(repository, name)
    rng = np.random.default_rng(2)

    def raw(batch: int) -> None:
        runtime.infer({"INPUT_IDS": rng.integers(0, 30522, size=(batch, 128), dtype=np.int64)})

    return raw


RESNET_CONFIG = """
name: "{name}"
backend: "pytorch"
max_batch_size: 256
input [ {{ name: "IMAGE", data_type: TYPE_FP32, dims: [ 3, 224, 224 ] }} ]
output [ {{ name: "LOGITS", data_type: TYPE_FP32, dims: [ 1000 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [ {{ count: 1, kind: KIND_GPU }} ]
parameters {{ key: "precision" value: {{ string_value: "fp16" }} }}
parameters {{ key: "cuda_graphs" value: {{ string_value: "true" }} }}
"""


def resnet50_module():
    """ResNet-50 (bottleneck blocks 3-4-6-3, 25.6M parameters) with random weights, written out
    here (no torchvision); weights and activations in channels_last, as cuDNN runs it fastest."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                *conv_bn(cin, width, 1), nn.ReLU(inplace=True),
                *conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                *conv_bn(width, cout, 1),
            )  # fmt: skip
            self.shortcut = (
                nn.Sequential(*conv_bn(cin, cout, 1, stride))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.shortcut(x))

    class ResNet50(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [*conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(3, 2, 1))
            cin = 64
            for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                for block in range(blocks):
                    layers.append(Bottleneck(cin, width, stride if block == 0 else 1))
                    cin = width * 4
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(2048, 1000)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.features(image.contiguous(memory_format=torch.channels_last))
            return self.head(torch.flatten(torch.mean(x, dim=(2, 3), keepdim=True), 1))

    torch.manual_seed(0)
    return ResNet50().eval().to(memory_format=torch.channels_last)


def build_resnet50(repository: Path, name: str = "resnet50") -> Callable[[int], None]:
    """ResNet-50 as TorchScript, fp16 on the GPU with CUDA graphs: one 224x224 image a request."""
    import torch

    module = torch.jit.script(resnet50_module())
    version = repository / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    module.save(str(version / "model.pt"))
    (repository / name / "config.pbtxt").write_text(RESNET_CONFIG.format(name=name))
    runtime = load_runtime(repository, name)
    rng = np.random.default_rng(3)

    def raw(batch: int) -> None:
        runtime.infer({"IMAGE": rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)})

    return raw


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload(
        name="mlp",
        description="64->256->256->16 FP32 MLP (numpy, python backend), 1-row requests",
        shapes=(),
        raw_batch=64,
        build=build_mlp,
    ),
    "onnx_mlp": Workload(
        name="onnx_mlp",
        description="the same MLP on ONNX Runtime (CPU provider), 1-row requests",
        shapes=(),
        raw_batch=64,
        build=build_onnx_mlp,
    ),
    "torch_mlp": Workload(
        name="torch_mlp",
        description="the same MLP as TorchScript (CPU), 1-row requests",
        shapes=(),
        raw_batch=64,
        build=build_torch_mlp,
    ),
    "bert_base": Workload(
        name="bert_base",
        description="BERT-base-shaped encoder, seq 128, fp16 + CUDA graphs, one sequence a request",
        shapes=(),
        raw_batch=256,
        build=build_bert_base,
        perf_args=("--input-data", "zero"),  # random int64 ids would index past the vocabulary
    ),
    "resnet50": Workload(
        name="resnet50",
        description="ResNet-50, 224x224, channels_last, fp16 + CUDA graphs, one image a request",
        shapes=(),
        raw_batch=256,
        build=build_resnet50,
    ),
    "text_embedding": Workload(
        name="text_embedding",
        description="all-MiniLM-L6-v2 sentence embeddings (CPU), one sentence a request",
        shapes=(),
        raw_batch=64,
        build=build_text_embedding,
        perf_args=("--string-data", "Convoy batches requests from many clients into one pass."),
    ),
}
