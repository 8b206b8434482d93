"""The onnxruntime backend with padded batching: the server-fed lengths input is a graph input
the config does not declare, fed with each batch; a lengths input the graph lacks is refused at
load naming the parameter."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from convoy.config import InstanceGroup, InstanceKind, ModelConfig, ModelVersionSource
from convoy.errors import InvalidConfig
from convoy.padding import parse_padding
from convoy.runtimes.onnx import OnnxRuntime
from convoy.types import TensorSpec

INPUTS = (TensorSpec("ids", "INT64", (-1,)),)
OUTPUTS = (TensorSpec("shifted", "INT64", (-1,)),)


def write_shift(path: Path) -> None:
    """ids [b, n] INT64, lengths [b] INT64 -> shifted = ids + lengths (per row)."""
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["lengths", "axes"], ["column"]),
            helper.make_node("Add", ["ids", "column"], ["shifted"]),
        ],
        "shift",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "n"]),
            helper.make_tensor_value_info("lengths", TensorProto.INT64, ["b"]),
        ],
        [helper.make_tensor_value_info("shifted", TensorProto.INT64, ["b", "n"])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _source(tmp_path: Path, lengths_input: str) -> ModelVersionSource:
    write_shift(tmp_path / "m" / "1" / "model.onnx")
    parameters = {"padding_inputs": "ids", "padding_lengths_input": lengths_input}
    fail = lambda field, message: InvalidConfig(f"{field}: {message}")  # noqa: E731
    config = ModelConfig(
        name="m",
        backend="onnxruntime",
        max_batch_size=8,
        inputs=INPUTS,
        outputs=OUTPUTS,
        instance_groups=(InstanceGroup("cpu", kind=InstanceKind.CPU),),
        parameters=parameters,
        padding=parse_padding(parameters, INPUTS, OUTPUTS, 8, fail),
    )
    return ModelVersionSource(config, 1, tmp_path / "m" / "1")


def test_the_lengths_input_is_fed_without_being_declared(tmp_path):
    source = _source(tmp_path, "lengths")
    runtime = OnnxRuntime(replace(source, config=OnnxRuntime.complete_config(source)), 0)
    runtime.load()
    ids = np.array([[1, 2, 0], [4, 5, 6]], np.int64)
    outputs = runtime.infer({"ids": ids, "lengths": np.array([2, 3], np.int64)})
    np.testing.assert_array_equal(outputs["shifted"], ids + np.array([[2], [3]]))
    runtime.close()


def test_a_lengths_input_the_graph_lacks_is_refused_naming_the_parameter(tmp_path):
    source = _source(tmp_path, "sizes")
    with pytest.raises(InvalidConfig, match=r"parameters\.padding_lengths_input: 'sizes' is not"):
        OnnxRuntime.complete_config(source)
