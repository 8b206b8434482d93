"""Ragged batching through a real server (Triton's allow_ragged_batch, batch_input, batch_output):
concurrent gRPC and HTTP clients send different lengths, the batches really are ragged (the
model reports each batch's composition), every batch_input kind reaches the model, and every
client gets the answer computed from its own data. Config mistakes are refused at load naming
the field."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ConvoyProcess, serve_until_stopped

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
HAS_TORCH = importlib.util.find_spec("torch") is not None

BATCH_INPUTS = """
batch_input [
  { kind: BATCH_ELEMENT_COUNT target_name: "EC" data_type: TYPE_INT32 source_input: "RAGGED" },
  { kind: BATCH_ACCUMULATED_ELEMENT_COUNT target_name: "ACC" data_type: TYPE_FP32
    source_input: "RAGGED" },
  { kind: BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO target_name: "ACC0" data_type: TYPE_INT32
    source_input: "RAGGED" },
  { kind: BATCH_MAX_ELEMENT_COUNT_AS_SHAPE target_name: "MAXC" data_type: TYPE_INT32
    source_input: "RAGGED" },
  { kind: BATCH_ITEM_SHAPE target_name: "ITEMS" data_type: TYPE_INT32 source_input: "RAGGED" },
  { kind: BATCH_ITEM_SHAPE_FLATTEN target_name: "ITEMS_FLAT" data_type: TYPE_FP32
    source_input: "RAGGED" }
]
"""

PYTHON_CONFIG = (
    """
name: "ragged_py"
backend: "python"
max_batch_size: 16
input [
  { name: "RAGGED" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true },
  { name: "TAG" data_type: TYPE_INT32 dims: [ 1 ] }
]
output [
  { name: "OWN" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "ROW_SUM" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "CHECKS" data_type: TYPE_INT32 dims: [ 7 ] }
]
batch_output [ { target_name: "OWN" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "RAGGED" } ]
dynamic_batching { max_queue_delay_microseconds: 100000 }
parameters { key: "delay_ms" value { string_value: "30" } }
model_warmup [ {
  name: "three rows" batch_size: 3
  inputs { key: "RAGGED" value { data_type: TYPE_FP32 dims: [ 4 ] random_data: true } }
  inputs { key: "TAG" value { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true } }
} ]
"""
    + BATCH_INPUTS
)

#: A Convoy python model that locates each request's elements through the batch inputs alone
#: and answers from them: a wrong offset or scatter gives some client another's numbers.
PYTHON_MODEL = """
import time

import numpy as np


class Model:
    def initialize(self, config):
        self.delay = float(config["parameters"].get("delay_ms", "0")) / 1000

    def execute(self, inputs):
        time.sleep(self.delay)  # batches take a while: concurrent requests pile up meanwhile
        flat = inputs["RAGGED"]
        tags = inputs["TAG"][:, 0]
        counts = inputs["EC"].astype(np.int64)
        ends = inputs["ACC"].astype(np.int64)
        starts = inputs["ACC0"].astype(np.int64)
        items = inputs["ITEMS"]
        consistent = int(
            flat.ndim == 1
            and items.shape == (len(tags), 1)
            and np.array_equal(ends, np.cumsum(counts))
            and np.array_equal(starts, np.concatenate([[0], ends]))
            and inputs["MAXC"].shape == (counts.max(),)
            and np.array_equal(inputs["ITEMS_FLAT"], items.reshape(-1).astype(np.float32))
            and counts.sum() == flat.size
        )
        own = np.empty_like(flat)
        row_sum = np.zeros((len(tags), 1), np.float32)
        checks = np.zeros((len(tags), 7), np.int32)
        row = 0
        for request, count in enumerate(counts):
            start, end = starts[request], starts[request + 1]
            width = int(items[row, 0])
            rows = count // width if width else 1
            own[start:end] = flat[start:end] * 2 + tags[row]
            for item in range(rows):
                part = flat[start + item * width : start + (item + 1) * width]
                row_sum[row + item, 0] = part.sum()
                checks[row + item] = [
                    count,
                    ends[request] - starts[request],
                    items[row + item, 0],
                    int(inputs["ITEMS_FLAT"][row + item]),
                    consistent,
                    len(counts),
                    len(set(items[:, 0].tolist())),
                ]
            row += rows
        return {"OWN": own, "ROW_SUM": row_sum, "CHECKS": checks}
"""

ONNX_CONFIG = (
    """
name: "ragged_onnx"
backend: "onnxruntime"
max_batch_size: 16
input [ { name: "RAGGED" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true } ]
output [
  { name: "DOUBLED" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "SPAN" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "WIDTH" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "WIDTH_FLAT" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "MAX_COUNT" data_type: TYPE_INT32 dims: [ 1 ] }
]
batch_output [
  { target_name: "DOUBLED" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "RAGGED" }
]
dynamic_batching { max_queue_delay_microseconds: 100000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
model_warmup [ {
  name: "two rows" batch_size: 2
  inputs { key: "RAGGED" value { data_type: TYPE_FP32 dims: [ 5 ] zero_data: true } }
} ]
"""
    + BATCH_INPUTS
)


def write_onnx_model(model_dir: Path) -> None:
    """DOUBLED = RAGGED * 2 (scattered back); per row (batch-1 requests): COUNT = EC,
    SPAN = ACC - ACC0[:-1], WIDTH = ITEMS, WIDTH_FLAT = ITEMS_FLAT, MAX_COUNT = len(MAXC)."""
    from onnx import TensorProto, helper, save

    def tensor(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    column = helper.make_tensor("column", TensorProto.INT64, [2], [-1, 1])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("Mul", ["RAGGED", "two"], ["DOUBLED"]),
        helper.make_node("Reshape", ["EC", "column"], ["COUNT"]),
        # ACC0 without its leading zero: the start of every request.
        helper.make_node("Shape", ["ACC0"], ["acc0_len"]),
        helper.make_node("Constant", [], ["one"], value_ints=[1]),
        helper.make_node("Sub", ["acc0_len", "one"], ["requests"]),
        helper.make_node("Slice", ["ACC0", "zero_start", "requests"], ["starts"]),
        helper.make_node("Cast", ["ACC"], ["acc_int"], to=TensorProto.INT32),
        helper.make_node("Sub", ["acc_int", "starts"], ["span"]),
        helper.make_node("Reshape", ["span", "column"], ["SPAN"]),
        helper.make_node("Identity", ["ITEMS"], ["WIDTH"]),
        helper.make_node("Reshape", ["ITEMS_FLAT", "column"], ["WIDTH_FLAT"]),
        helper.make_node("Shape", ["MAXC"], ["max_shape"]),
        helper.make_node("Cast", ["max_shape"], ["max_int"], to=TensorProto.INT32),
        helper.make_node("Shape", ["COUNT"], ["rows_by_one"]),
        helper.make_node("Expand", ["max_int", "rows_by_one"], ["MAX_COUNT"]),
    ]
    zero_start = helper.make_tensor("zero_start", TensorProto.INT64, [1], [0])
    graph = helper.make_graph(
        nodes,
        "ragged",
        [
            tensor("RAGGED", TensorProto.FLOAT, [None]),
            tensor("EC", TensorProto.INT32, [None]),
            tensor("ACC", TensorProto.FLOAT, [None]),
            tensor("ACC0", TensorProto.INT32, [None]),
            tensor("MAXC", TensorProto.INT32, [None]),
            tensor("ITEMS", TensorProto.INT32, [None, 1]),
            tensor("ITEMS_FLAT", TensorProto.FLOAT, [None]),
        ],
        [
            tensor("DOUBLED", TensorProto.FLOAT, [None]),
            tensor("COUNT", TensorProto.INT32, [None, 1]),
            tensor("SPAN", TensorProto.INT32, [None, 1]),
            tensor("WIDTH", TensorProto.INT32, [None, 1]),
            tensor("WIDTH_FLAT", TensorProto.FLOAT, [None, 1]),
            tensor("MAX_COUNT", TensorProto.INT32, [None, 1]),
        ],
        [column, two, zero_start],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (model_dir / "1").mkdir(parents=True)
    save(model, str(model_dir / "1" / "model.onnx"))
    (model_dir / "config.pbtxt").write_text(ONNX_CONFIG)


def write_torch_model(model_dir: Path) -> None:
    """The ONNX model's outputs from TorchScript: the batch inputs come after RAGGED, in the
    order config.pbtxt lists them."""
    import torch

    class Ragged(torch.nn.Module):
        def forward(self, ragged, ec, acc, acc0, maxc, items, items_flat):
            span = acc.to(torch.int32) - acc0[:-1]
            longest = torch.full((ec.shape[0], 1), maxc.shape[0], dtype=torch.int32)
            return (
                ragged * 2,
                ec.view(-1, 1),
                span.view(-1, 1),
                items,
                items_flat.view(-1, 1),
                longest,
            )

    (model_dir / "1").mkdir(parents=True)
    torch.jit.script(Ragged()).save(str(model_dir / "1" / "model.pt"))
    (model_dir / "config.pbtxt").write_text(
        ONNX_CONFIG.replace('name: "ragged_onnx"', 'name: "ragged_torch"').replace(
            'backend: "onnxruntime"', 'backend: "pytorch"'
        )
    )


#: Configs refused at load: (model, the field the reason must name, a phrase of the reason).
REFUSED = {
    "bad_source": (
        PYTHON_CONFIG.replace(
            'target_name: "EC" data_type: TYPE_INT32 source_input: "RAGGED"',
            'target_name: "EC" data_type: TYPE_INT32 source_input: "NOPE"',
        ),
        "batch_input[0].source_input",
        "'NOPE' is not a declared input",
    ),
    "unknown_kind": (
        PYTHON_CONFIG.replace("kind: BATCH_ELEMENT_COUNT target_name", "kind: 17 target_name"),
        "batch_input[0].kind",
        "unknown kind 17",
    ),
    "bad_type": (
        PYTHON_CONFIG.replace('"EC" data_type: TYPE_INT32', '"EC" data_type: TYPE_INT64'),
        "batch_input[0].data_type",
        "expected TYPE_INT32 or TYPE_FP32",
    ),
    "target_clash": (
        PYTHON_CONFIG.replace('target_name: "EC"', 'target_name: "TAG"'),
        "batch_input[0].target_name",
        "'TAG' is also a declared input",
    ),
    "unbatched": (
        PYTHON_CONFIG.replace("max_batch_size: 16", "max_batch_size: 0").replace(
            "dynamic_batching { max_queue_delay_microseconds: 100000 }", ""
        ),
        "input[0].allow_ragged_batch",
        "requires max_batch_size > 0",
    ),
    "bad_output": (
        PYTHON_CONFIG.replace('target_name: "OWN" kind', 'target_name: "NOPE" kind'),
        "batch_output[0].target_name",
        "'NOPE' is not a declared output",
    ),
}

TRITON_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("OWN", pb_utils.get_input_tensor_by_name(r, "RAGGED").as_numpy())]
            )
            for r in requests
        ]
"""


TRITON_RAGGED_CONFIG = """
name: "%s"
backend: "python"
max_batch_size: 16
input [ { name: "RAGGED" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true } ]
output [
  { name: "OWN" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "INFO" data_type: TYPE_INT32 dims: [ 2 ] }
]
dynamic_batching { max_queue_delay_microseconds: 100000 }
parameters { key: "isolation" value { string_value: "%s" } }
"""

#: A Triton python model on a ragged input: one execute() gets requests of different lengths,
#: each with its own shape; INFO = [requests in this execute, distinct lengths among them].
TRITON_RAGGED_MODEL = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(0.03)
        arrays = [pb_utils.get_input_tensor_by_name(r, "RAGGED").as_numpy() for r in requests]
        info = [len(arrays), len({a.shape for a in arrays})]
        return [
            pb_utils.InferenceResponse(
                [
                    pb_utils.Tensor("OWN", a * 2),
                    pb_utils.Tensor("INFO", np.array([info] * a.shape[0], np.int32)),
                ]
            )
            for a in arrays
        ]
"""


def build_repository(root: Path) -> Path:
    root.mkdir(parents=True)
    models = {
        "ragged_py": PYTHON_CONFIG,
        # The same model in a worker process: the batch inputs travel with the merged batch.
        "ragged_py_process": PYTHON_CONFIG
        + 'parameters { key: "isolation" value { string_value: "process" } }\n',
    }
    models.update({name: config for name, (config, _, _) in REFUSED.items()})
    for name, config in models.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config.replace('name: "ragged_py"', f'name: "{name}"'))
        (root / name / "1" / "model.py").write_text(PYTHON_MODEL)
    # A Triton python model executes request by request: batch inputs are refused for it.
    (root / "triton_batch_input" / "1").mkdir(parents=True)
    (root / "triton_batch_input" / "config.pbtxt").write_text(
        PYTHON_CONFIG.replace('name: "ragged_py"', 'name: "triton_batch_input"')
    )
    (root / "triton_batch_input" / "1" / "model.py").write_text(TRITON_MODEL)
    for isolation in ("thread", "process"):
        name = f"triton_ragged_{isolation}"
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(TRITON_RAGGED_CONFIG % (name, isolation))
        (root / name / "1" / "model.py").write_text(TRITON_RAGGED_MODEL)
    if HAS_ONNX:
        write_onnx_model(root / "ragged_onnx")
    if HAS_TORCH:
        write_torch_model(root / "ragged_torch")
    return root


@pytest.fixture(scope="module", params=["single-process", "workers"])
def ragged_server(request, tmp_path_factory):
    """One process, and `--workers 2` (an engine behind two front-end processes): the batching
    happens in the engine either way."""
    root = tmp_path_factory.mktemp(f"ragged-{request.param}")
    extra = ("--workers", "2") if request.param == "workers" else ()
    process = ConvoyProcess(build_repository(root / "models"), root / "server.log", extra)
    yield from serve_until_stopped(process, "live")


def _infer(client, module, model: str, values: np.ndarray, tag: int | None, outputs: list[str]):
    inputs = [module.InferInput("RAGGED", list(values.shape), "FP32")]
    inputs[0].set_data_from_numpy(values)
    if tag is not None:
        tags = np.full((values.shape[0], 1), tag, np.int32)
        inputs.append(module.InferInput("TAG", list(tags.shape), "INT32"))
        inputs[1].set_data_from_numpy(tags)
    requested = [module.InferRequestedOutput(name) for name in outputs]
    result = client.infer(model, inputs, outputs=requested)
    return {name: result.as_numpy(name) for name in outputs}


def _run_clients(server: ConvoyProcess, work) -> list[Exception]:
    """12 clients, half gRPC and half HTTP, each calling `work(client, module, index)` 6 times."""
    errors: list[Exception] = []

    def client_thread(index: int) -> None:
        if index % 2:
            client, module = httpclient.InferenceServerClient(server.http_url), httpclient
        else:
            client, module = grpcclient.InferenceServerClient(server.grpc_url), grpcclient
        try:
            for step in range(6):
                work(client, module, index * 100 + step)
        except Exception as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def _statistics(server: ConvoyProcess, model: str) -> tuple[int, int]:
    stats = requests.get(f"{server.base_url}/v2/models/{model}/stats", timeout=10).json()
    entry = stats["model_stats"][0]
    return int(entry["inference_count"]), int(entry["execution_count"])


@pytest.mark.parametrize("model", ["ragged_py", "ragged_py_process"])
def test_concurrent_ragged_requests_each_get_their_own_answer(ragged_server, model):
    """Lengths 1..9, some requests of batch 2, tags unique per request: OWN (scattered by the
    request's shape) is its own values * 2 + its tag, ROW_SUM its rows' sums, and the batch
    inputs told the model the request's element count, span and item width."""
    seen_batches: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(client, module, tag: int) -> None:
        length = 1 + tag % 9
        rows = 2 if tag % 5 == 0 else 1
        values = (np.arange(rows * length, dtype=np.float32).reshape(rows, length) + tag) / 7
        got = _infer(client, module, model, values, tag, ["OWN", "ROW_SUM", "CHECKS"])
        assert got["OWN"].shape == (rows, length)
        np.testing.assert_allclose(got["OWN"], values * 2 + tag, rtol=1e-6)
        np.testing.assert_allclose(got["ROW_SUM"], values.sum(axis=1, keepdims=True), rtol=1e-5)
        checks = got["CHECKS"]
        assert checks.shape == (rows, 7)
        for row in checks:
            assert row[:5].tolist() == [rows * length, rows * length, length, length, 1], row
        with lock:
            seen_batches.append((int(checks[0, 5]), int(checks[0, 6])))

    before = _statistics(ragged_server, model)
    errors = _run_clients(ragged_server, work)
    assert not errors, errors[:3]
    inferences, executions = (
        a - b for a, b in zip(_statistics(ragged_server, model), before, strict=True)
    )
    assert inferences == sum(2 if (i * 100 + s) % 5 == 0 else 1 for i in range(12) for s in range(6))
    assert executions < 72, (inferences, executions)
    # Batches really mixed lengths: some held several requests of different widths.
    assert max(distinct for requests_in_batch, distinct in seen_batches if requests_in_batch > 1) > 1


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("ragged_onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="needs onnx")),
        pytest.param("ragged_torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="needs torch")),
    ],
)
def test_onnx_and_torch_models_receive_every_batch_input_and_scatter_back(ragged_server, model):
    """The model takes the batch inputs as inputs (declared in the ONNX graph; after RAGGED in
    forward's arguments); each request gets its own doubled values and the counts the batch
    inputs gave for it."""
    max_counts: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(client, module, tag: int) -> None:
        length = 1 + tag % 11
        values = (np.arange(length, dtype=np.float32) + 100 * tag).reshape(1, length)
        names = ["DOUBLED", "COUNT", "SPAN", "WIDTH", "WIDTH_FLAT", "MAX_COUNT"]
        got = _infer(client, module, model, values, None, names)
        np.testing.assert_array_equal(got["DOUBLED"], values * 2)
        assert got["COUNT"].tolist() == [[length]]
        assert got["SPAN"].tolist() == [[length]]
        assert got["WIDTH"].tolist() == [[length]]
        assert got["WIDTH_FLAT"].tolist() == [[length]]
        assert got["MAX_COUNT"][0, 0] >= length
        with lock:
            max_counts.append((int(got["MAX_COUNT"][0, 0]), length))

    errors = _run_clients(ragged_server, work)
    assert not errors, errors[:3]
    inferences, executions = _statistics(ragged_server, model)
    assert inferences == 72
    assert executions < 72, (inferences, executions)
    # Some batch mixed lengths: its longest request was longer than some member's own.
    assert any(longest > own for longest, own in max_counts)


@pytest.mark.parametrize(("model", "field", "phrase"), [(m, f, p) for m, (_, f, p) in REFUSED.items()])
def test_ragged_config_mistakes_are_refused_at_load_naming_the_field(
    ragged_server, model, field, phrase
):
    rows = requests.post(f"{ragged_server.base_url}/v2/repository/index", timeout=10).json()
    row = next(r for r in rows if r["name"] == model)
    assert row["state"] == "UNAVAILABLE"
    assert f"config.pbtxt: {field}: " in row["reason"]
    assert phrase in row["reason"]


def test_a_triton_python_model_refuses_batch_inputs_naming_the_field(ragged_server):
    rows = requests.post(f"{ragged_server.base_url}/v2/repository/index", timeout=10).json()
    row = next(r for r in rows if r["name"] == "triton_batch_input")
    assert row["state"] == "UNAVAILABLE"
    assert "config.pbtxt: batch_input: a TritonPythonModel executes each request" in row["reason"]


def test_clients_cannot_send_a_batch_input(ragged_server):
    client = grpcclient.InferenceServerClient(ragged_server.grpc_url)
    try:
        inputs = [
            grpcclient.InferInput(name, shape, dtype)
            for name, shape, dtype in (
                ("RAGGED", [1, 2], "FP32"),
                ("TAG", [1, 1], "INT32"),
                ("EC", [1], "INT32"),
            )
        ]
        inputs[0].set_data_from_numpy(np.zeros((1, 2), np.float32))
        inputs[1].set_data_from_numpy(np.zeros((1, 1), np.int32))
        inputs[2].set_data_from_numpy(np.zeros(1, np.int32))
        with pytest.raises(Exception, match="unexpected input 'EC'"):
            client.infer("ragged_py", inputs)
    finally:
        client.close()


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_triton_python_model_executes_ragged_requests_together_each_with_its_shape(
    ragged_server, isolation
):
    """Triton's python backend gets a ragged batch as requests of different shapes in one
    execute(); with isolation: process, those of one shape travel together to the worker."""
    model = f"triton_ragged_{isolation}"
    infos: list[list[int]] = []
    lock = threading.Lock()

    def work(client, module, tag: int) -> None:
        length = 1 + tag % 7
        values = (np.arange(length, dtype=np.float32) + 100 * tag).reshape(1, length)
        got = _infer(client, module, model, values, None, ["OWN", "INFO"])
        np.testing.assert_array_equal(got["OWN"], values * 2)
        with lock:
            infos.append(got["INFO"][0].tolist())

    errors = _run_clients(ragged_server, work)
    assert not errors, errors[:3]
    if isolation == "thread":
        # One execute() held requests of different lengths.
        assert max(distinct for count, distinct in infos if count > 1) > 1, infos
    else:
        assert max(count for count, _ in infos) > 1, infos
