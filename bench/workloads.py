"""Benchmark workloads: a model repository entry plus the same model callable in-process.

Each workload writes its model into a repository folder and returns a `raw(batch)` function
that runs exactly what the server runs, so served and raw throughput compare like with like.
"""

from __future__ import annotations

import importlib.util
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

MLP_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 256
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 64 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
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


def _load_python_model(version_dir: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    if hasattr(model, "initialize"):
        model.initialize({"path": str(version_dir), "name": name, "parameters": {}})
    return model


def build_mlp(repository: Path, name: str = "mlp") -> Callable[[int], None]:
    version = repository / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (repository / name / "config.pbtxt").write_text(MLP_CONFIG.format(name=name))
    (version / "model.py").write_text(MLP_MODEL)
    rng = np.random.default_rng(0)
    sizes = [(64, 256), (256, 256), (256, 16)]
    arrays = {}
    for i, (fan_in, fan_out) in enumerate(sizes):
        arrays[f"w{i}"] = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        arrays[f"b{i}"] = np.zeros(fan_out, dtype=np.float32)
    np.savez(version / "weights.npz", **arrays)
    model = _load_python_model(version, name)

    def raw(batch: int) -> None:
        model.execute({"INPUT0": rng.standard_normal((batch, 64)).astype(np.float32)})

    return raw


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload(
        name="mlp",
        description="64->256->256->16 FP32 MLP (numpy, python backend), 1-row requests",
        shapes=(),
        raw_batch=64,
        build=build_mlp,
    ),
}
