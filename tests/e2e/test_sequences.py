"""The sequence batcher through a real server: Triton's simple_sequence semantics (START resets,
each request adds, OUTPUT is the running total) over gRPC unary, gRPC streaming and HTTP, both
strategies, interleaved sequences, idle timeout, implicit state, and load-time refusals."""

from __future__ import annotations

import importlib.util
import queue
import shutil
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import MODEL_SOURCES, WITH_WORKERS, ConvoyProcess, Protocol, serve_until_stopped
from tritonclient.utils import InferenceServerException

CONTROLS = """
  control_input [
    { name: "START", control [ { kind: CONTROL_SEQUENCE_START, int32_false_true: [ 0, 1 ] } ] },
    { name: "END", control [ { kind: CONTROL_SEQUENCE_END, int32_false_true: [ 0, 1 ] } ] },
    { name: "READY", control [ { kind: CONTROL_SEQUENCE_READY, int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID", control [ { kind: CONTROL_SEQUENCE_CORRID, data_type: %s } ] }
  ]
"""


def write_sequence_model(
    repository: Path,
    name: str,
    strategy: str,
    max_batch_size: int = 4,
    corrid_type: str = "TYPE_UINT64",
    idle_us: int = 10_000_000,
    parameters: dict[str, str] | None = None,
    extra: str = "",
    controls: str | None = None,
) -> None:
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True)
    shutil.copy(MODEL_SOURCES / "sequence_accumulator" / "model.py", model_dir / "1" / "model.py")
    dims = "[ 1 ]"
    params = "".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
        for k, v in (parameters or {}).items()
    )
    (model_dir / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        f'input [ {{ name: "INPUT", data_type: TYPE_INT32, dims: {dims} }} ]\n'
        f'output [ {{ name: "OUTPUT", data_type: TYPE_INT32, dims: {dims} }} ]\n'
        "sequence_batching {\n"
        f"  max_sequence_idle_microseconds: {idle_us}\n"
        f"  {strategy}\n"
        f"{CONTROLS % corrid_type if controls is None else controls}"
        f"{extra}"
        "}\n"
        f"{params}"
    )


STATE = """
  state [ { input_name: "ACC_IN", output_name: "ACC_OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
"""
START_ONLY = """
  control_input [
    { name: "START", control [ { kind: CONTROL_SEQUENCE_START, int32_false_true: [ 0, 1 ] } ] }
  ]
"""


HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
HAS_TORCH = importlib.util.find_spec("torch") is not None
BACKEND_MODELS = [
    pytest.param("seq_onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="needs onnxruntime")),
    pytest.param("seq_torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="needs torch")),
]

BACKEND_SEQUENCE = """name: "{name}"
backend: "{backend}"
max_batch_size: 4
input [ {{ name: "INPUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
sequence_batching {{
  oldest {{ max_candidate_sequences: 8 }}
  control_input [
    {{ name: "START", control [ {{ kind: CONTROL_SEQUENCE_START, int32_false_true: [ 0, 1 ] }} ] }}
  ]
  state [ {{ input_name: "ACC_IN", output_name: "ACC_OUT", data_type: TYPE_INT32, dims: [ 1 ] }} ]
}}
"""


def write_onnx_accumulator(root: Path) -> None:
    """OUTPUT = INPUT + ACC_IN * (1 - START); ACC_OUT = OUTPUT (ONNX Runtime backend)."""
    from onnx import TensorProto, helper, save

    def value(name):
        return helper.make_tensor_value_info(name, TensorProto.INT32, [None, 1])

    one = helper.make_tensor("one", TensorProto.INT32, [], [1])
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["one", "START"], ["keep"]),
            helper.make_node("Mul", ["ACC_IN", "keep"], ["kept"]),
            helper.make_node("Add", ["INPUT", "kept"], ["OUTPUT"]),
            helper.make_node("Identity", ["OUTPUT"], ["ACC_OUT"]),
        ],
        "accumulator",
        [value("INPUT"), value("START"), value("ACC_IN")],
        [value("OUTPUT"), value("ACC_OUT")],
        [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (root / "seq_onnx" / "1").mkdir(parents=True)
    save(model, str(root / "seq_onnx" / "1" / "model.onnx"))
    (root / "seq_onnx" / "config.pbtxt").write_text(
        BACKEND_SEQUENCE.format(name="seq_onnx", backend="onnxruntime")
    )


def write_torch_accumulator(root: Path) -> None:
    """The same accumulator as TorchScript (inputs by position: INPUT, START, ACC_IN)."""
    import torch

    class Accumulator(torch.nn.Module):
        def forward(self, value, start, acc):
            total = value + acc * (1 - start)
            return total, total

    (root / "seq_torch" / "1").mkdir(parents=True)
    torch.jit.script(Accumulator()).save(str(root / "seq_torch" / "1" / "model.pt"))
    (root / "seq_torch" / "config.pbtxt").write_text(
        BACKEND_SEQUENCE.format(name="seq_torch", backend="pytorch")
    )


def build_sequence_repository(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    # direct: totals kept per batch slot, so a wrong slot gives a wrong total.
    write_sequence_model(root, "seq_direct", "direct { }", parameters={"key_by": "slot"})
    write_sequence_model(
        root,
        "seq_oldest",
        "oldest { max_candidate_sequences: 64 max_queue_delay_microseconds: 2000 }",
        max_batch_size=16,
    )
    write_sequence_model(root, "seq_string", "oldest { }", corrid_type="TYPE_STRING")
    write_sequence_model(root, "seq_idle", "direct { }", idle_us=300_000)
    write_sequence_model(root, "seq_unbatched", "direct { }", max_batch_size=0)
    write_sequence_model(
        root,
        "seq_state",
        "oldest { max_candidate_sequences: 8 }",
        controls=START_ONLY,
        extra=STATE,
    )
    # 32 concurrent sequences, each batch takes 20 ms: they must ride together.
    write_sequence_model(
        root,
        "seq_slow",
        "oldest { max_candidate_sequences: 64 }",
        max_batch_size=32,
        parameters={"delay_ms": "20"},
    )
    # Each batch takes 300 ms: a request queued behind one can time out.
    write_sequence_model(root, "seq_cancel", "oldest { }", parameters={"delay_ms": "300"})
    # A fatal error replaces the instance; the implicit state (kept by the batcher) survives.
    write_sequence_model(
        root,
        "seq_fatal",
        "oldest { }",
        controls=START_ONLY,
        extra=STATE,
        parameters={"fatal_value": "666"},
    )
    # Control and state inputs reach ONNX Runtime and TorchScript models too.
    if HAS_ONNX:
        write_onnx_accumulator(root)
    if HAS_TORCH:
        write_torch_accumulator(root)
    # An ensemble in front of a sequence model: the sequence parameters travel to its step.
    (root / "seq_ensemble").mkdir()
    (root / "seq_ensemble" / "config.pbtxt").write_text(
        'name: "seq_ensemble"\nplatform: "ensemble"\nmax_batch_size: 4\n'
        'input [ { name: "INPUT", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
        'output [ { name: "OUTPUT", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
        'ensemble_scheduling { step [ { model_name: "seq_direct" model_version: -1 '
        'input_map { key: "INPUT" value: "INPUT" } output_map { key: "OUTPUT" value: "OUTPUT" } '
        "} ] }\n"
    )
    # Refused at load, each with a reason naming the field.
    write_sequence_model(root, "seq_iterative", "direct { }", extra="  iterative_sequence: true\n")
    write_sequence_model(root, "seq_ordering", "oldest { preserve_ordering: true }")
    write_sequence_model(
        root,
        "seq_state_file",
        "oldest { }",
        controls=START_ONLY,
        extra=STATE.replace(
            "dims: [ 1 ] }",
            'dims: [ 1 ] initial_state [ { name: "x" data_type: TYPE_INT32 '
            'dims: [ 1 ] data_file: "init.bin" } ] }',
        ),
    )
    return root


@pytest.fixture(scope="module")
def seq_server(tmp_path_factory, frontend):
    root = tmp_path_factory.mktemp("sequences")
    process = ConvoyProcess(
        build_sequence_repository(root / "models"), root / "server.log", frontend=frontend
    )
    yield from serve_until_stopped(process, "live")


@pytest.fixture(scope="module")
def grpc(seq_server):
    client = grpcclient.InferenceServerClient(seq_server.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(seq_server):
    client = httpclient.InferenceServerClient(seq_server.http_url, concurrency=8)
    yield client
    client.close()


@pytest.fixture(params=["grpc", "http"])
def protocol(request, grpc, http) -> Protocol:
    if request.param == "grpc":
        return Protocol("grpc", grpc, grpcclient)
    return Protocol("http", http, httpclient)


def send(protocol: Protocol, model: str, value: int, sequence_id, start=False, end=False) -> int:
    shape = (1, 1) if model != "seq_unbatched" else (1,)
    tensor = protocol.input("INPUT", np.full(shape, value, dtype=np.int32), "INT32")
    result = protocol.client.infer(
        model, [tensor], sequence_id=sequence_id, sequence_start=start, sequence_end=end
    )
    return int(result.as_numpy("OUTPUT").reshape(-1)[0])


def run_sequence(protocol, model, sequence_id, values) -> list[int]:
    last = len(values) - 1
    return [
        send(protocol, model, v, sequence_id, start=i == 0, end=i == last) for i, v in enumerate(values)
    ]


def running_totals(values) -> list[int]:
    return [int(x) for x in np.cumsum(values)]


@pytest.mark.frontends(*WITH_WORKERS)
@pytest.mark.parametrize(
    "model",
    ["seq_direct", "seq_oldest", "seq_unbatched", "seq_state", "seq_ensemble", *BACKEND_MODELS],
)
def test_sequence_output_is_the_running_total(protocol, model):
    # Triton's sequence client examples: 1, then +100, then -80 -> 1 : 101 : 21.
    assert run_sequence(protocol, model, 1001, [1, 100, -80]) == [1, 101, 21]


def test_start_resets_the_running_total(protocol):
    send(protocol, "seq_oldest", 5, 77, start=True)
    send(protocol, "seq_oldest", 5, 77)
    assert send(protocol, "seq_oldest", 3, 77, start=True) == 3
    assert send(protocol, "seq_oldest", 4, 77, end=True) == 7


def test_string_correlation_ids(protocol):
    assert run_sequence(protocol, "seq_string", "session-a", [2, 3, 4]) == [2, 5, 9]


def test_string_id_for_a_uint64_model_is_refused(protocol):
    with pytest.raises(InferenceServerException) as caught:
        send(protocol, "seq_oldest", 1, "abc", start=True)
    assert caught.value.status() == protocol.status("INVALID_ARGUMENT")
    assert "sequence_id" in caught.value.message()


@pytest.mark.frontends(*WITH_WORKERS)
def test_missing_correlation_id_gets_tritons_error(protocol):
    tensor = protocol.input("INPUT", np.ones((1, 1), dtype=np.int32), "INT32")
    with pytest.raises(InferenceServerException) as caught:
        protocol.client.infer("seq_direct", [tensor])
    assert caught.value.status() == protocol.status("INVALID_ARGUMENT")
    assert "must specify a non-zero or non-empty correlation ID" in caught.value.message()


def test_request_without_start_on_an_unknown_sequence_is_refused(protocol):
    with pytest.raises(InferenceServerException) as caught:
        send(protocol, "seq_direct", 1, 424242)
    assert caught.value.status() == protocol.status("INVALID_ARGUMENT")
    assert "START" in caught.value.message()


def test_request_after_end_needs_a_new_start(protocol):
    run_sequence(protocol, "seq_oldest", 5150, [1, 2])
    with pytest.raises(InferenceServerException) as caught:
        send(protocol, "seq_oldest", 1, 5150)
    assert "START" in caught.value.message()


@pytest.mark.frontends(*WITH_WORKERS)
@pytest.mark.parametrize("model", ["seq_direct", "seq_oldest", "seq_string"])
def test_interleaved_concurrent_sequences_keep_their_own_totals(protocol, model, seq_server):
    """Eight sequences in eight threads, each request waiting for the one before: every
    sequence gets its own running total (direct: from its slot; oldest: from its CORRID)."""
    rng = np.random.default_rng(7)
    plans = {
        (f"s{index}" if model == "seq_string" else 9000 + index): [
            int(v) for v in rng.integers(-50, 50, size=12)
        ]
        for index in range(8)
    }
    got: dict = {}
    errors: list = []

    def run(sequence_id, values):
        # tritonclient's HTTP client is not thread-safe: one per thread.
        client = protocol
        if protocol.name == "http":
            client = Protocol("http", httpclient.InferenceServerClient(seq_server.http_url), httpclient)
        try:
            got[sequence_id] = run_sequence(client, model, sequence_id, values)
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            if client is not protocol:
                client.client.close()

    threads = [threading.Thread(target=run, args=item) for item in plans.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert got == {key: running_totals(values) for key, values in plans.items()}


@pytest.mark.frontends(*WITH_WORKERS)
def test_grpc_stream_sequences(seq_server):
    """Two sequences interleaved on one gRPC stream (Triton's sequence stream client)."""
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(seq_server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    values = [11, 7, 5, 3, 2, 0, 1]
    try:
        for index, value in enumerate(values):
            for sequence_id, sign in ((1000, 1), (1001, -1)):
                tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
                tensor.set_data_from_numpy(np.array([[sign * value]], dtype=np.int32))
                client.async_stream_infer(
                    "seq_oldest",
                    [tensor],
                    request_id=f"{sequence_id}-{index}",
                    sequence_id=sequence_id,
                    sequence_start=index == 0,
                    sequence_end=index == len(values) - 1,
                )
        results: dict[str, int] = {}
        for _ in range(2 * len(values)):
            result, error = answers.get(timeout=30)
            assert error is None, error
            response = result.get_response()
            results[response.id] = int(result.as_numpy("OUTPUT")[0, 0])
    finally:
        client.stop_stream()
        client.close()
    totals = running_totals(values)
    for index in range(len(values)):
        assert results[f"1000-{index}"] == totals[index]
        assert results[f"1001-{index}"] == -totals[index]


def test_idle_sequence_is_released_with_an_error_that_says_so(protocol):
    sequence_id = 31337 if protocol.name == "grpc" else 31338
    assert send(protocol, "seq_idle", 4, sequence_id, start=True) == 4
    touched = time.monotonic()
    deadline = touched + 30
    pace = threading.Event()  # never set: wait() paces the polling
    while True:
        # Any request of the sequence restarts its idle clock (300 ms): ask only once it ran out.
        if time.monotonic() - touched < 0.6:
            pace.wait(0.05)
            continue
        try:
            send(protocol, "seq_idle", 1, sequence_id)
        except InferenceServerException as exc:
            assert exc.status() == protocol.status("INVALID_ARGUMENT")
            assert "idle" in exc.message() and "max_sequence_idle_microseconds" in exc.message()
            break
        touched = time.monotonic()
        assert touched < deadline, "the idle sequence was never released"
    # A new START opens it again.
    assert send(protocol, "seq_idle", 2, sequence_id, start=True, end=True) == 2


def test_oldest_batches_concurrent_sequences(grpc):
    """32 sequences at once on a model whose batch takes 20 ms: they share batches."""
    before = grpc.get_inference_statistics("seq_slow", as_json=True)["model_stats"][0]
    protocol = Protocol("grpc", grpc, grpcclient)
    errors: list = []

    def run(sequence_id):
        try:
            assert run_sequence(protocol, "seq_slow", sequence_id, [1, 2, 3, 4]) == [1, 3, 6, 10]
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(7000 + i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    after = grpc.get_inference_statistics("seq_slow", as_json=True)["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == 32 * 4
    assert executions < inferences / 2, (inferences, executions)


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ("seq_iterative", "sequence_batching.iterative_sequence"),
        ("seq_ordering", "sequence_batching.oldest.preserve_ordering"),
        ("seq_state_file", "sequence_batching.state[0].initial_state[0]"),
    ],
)
def test_unsupported_sequence_fields_are_refused_at_load(seq_server, model, field):
    rows = requests.post(f"{seq_server.base_url}/v2/repository/index", timeout=10).json()
    row = next(r for r in rows if r["name"] == model)
    assert row["state"] == "UNAVAILABLE"
    assert field in row["reason"]


def test_sequence_requests_wait_for_their_predecessor(grpc, seq_server):
    """Several requests of one sequence in flight at once (async): they run in order."""
    done: queue.Queue = queue.Queue()
    sequence_id = 4444
    values = list(range(1, 11))
    for index, value in enumerate(values):
        tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
        grpc.async_infer(
            "seq_oldest",
            [tensor],
            partial(lambda i, result, error: done.put((i, result, error)), index),
            sequence_id=sequence_id,
            sequence_start=index == 0,
        )
        # async_infer may reorder on the wire; the first must arrive first.
        if index == 0:
            item = done.get(timeout=30)
            assert item[2] is None, item[2]
            first = item
    results = {first[0]: int(first[1].as_numpy("OUTPUT")[0, 0])}
    for _ in range(len(values) - 1):
        index, result, error = done.get(timeout=30)
        assert error is None, error
        results[index] = int(result.as_numpy("OUTPUT")[0, 0])
    # Requests 2..10 may be received in any order; each adds its value exactly once.
    assert sorted(results.values())[-1] == sum(values)
    assert results[0] == 1


def test_timed_out_request_leaves_the_sequence_state_alone(grpc):
    """A request that gives up while queued behind its predecessor never reaches the model: the
    running total goes on without it."""
    first: queue.Queue = queue.Queue()
    tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    grpc.async_infer(
        "seq_cancel",
        [tensor],
        lambda result, error: first.put((result, error)),
        sequence_id=777,
        sequence_start=True,
    )
    late = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    late.set_data_from_numpy(np.array([[100]], dtype=np.int32))
    with pytest.raises(InferenceServerException):
        grpc.infer("seq_cancel", [late], sequence_id=777, client_timeout=0.1)
    result, error = first.get(timeout=30)
    assert error is None, error
    assert int(result.as_numpy("OUTPUT")[0, 0]) == 1
    protocol = Protocol("grpc", grpc, grpcclient)
    assert send(protocol, "seq_cancel", 10, 777, end=True) == 11


def test_clients_see_no_control_or_state_tensors(grpc):
    models = ["seq_state"] + ["seq_onnx"] * HAS_ONNX + ["seq_torch"] * HAS_TORCH
    for model in models:
        metadata = grpc.get_model_metadata(model, as_json=True)
        assert [t["name"] for t in metadata["inputs"]] == ["INPUT"]
        assert [t["name"] for t in metadata["outputs"]] == ["OUTPUT"]


def test_fatal_error_replaces_the_instance_and_the_implicit_state_survives(grpc):
    protocol = Protocol("grpc", grpc, grpcclient)
    assert send(protocol, "seq_fatal", 1, 606, start=True) == 1
    assert send(protocol, "seq_fatal", 2, 606) == 3
    with pytest.raises(InferenceServerException) as caught:
        send(protocol, "seq_fatal", 666, 606)
    assert "poisoned" in caught.value.message()
    deadline = time.monotonic() + 60
    pace = threading.Event()
    while True:  # the model is unready until its fresh instance is up
        try:
            total = send(protocol, "seq_fatal", 4, 606, end=True)
            break
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.UNAVAILABLE", exc
            assert time.monotonic() < deadline
            pace.wait(0.05)
    assert total == 7
