"""Payload logging against a real server: which requests are logged (rate 1, 0, absent,
fractional), what a line holds over HTTP and gRPC, truncation, rotation, and a full queue that
drops and counts while every request still succeeds. Waits poll the /metrics counters."""

from __future__ import annotations

import contextlib
import os
import shutil
from datetime import datetime

import numpy as np
import orjson
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import (
    FRONTENDS,
    WORKERS_FRONTEND,
    ConvoyProcess,
    copy_model,
    poll,
    serve_until_stopped,
    write_identity_model,
)
from prometheus_client.parser import text_string_to_metric_families

from convoy.cli import demo_repository

pytestmark = pytest.mark.frontends(FRONTENDS[0], WORKERS_FRONTEND)

MAX_BYTES = 16_000
BACKUPS = 2
MAX_ELEMENTS = 64
QUEUE_SIZE = 4


def opt_in(repository, name: str, rate: str = "1") -> None:
    """Append the `payload_log_sample_rate` parameter to a model's config.pbtxt."""
    with (repository / name / "config.pbtxt").open("a") as handle:
        handle.write(
            f'parameters {{ key: "payload_log_sample_rate" value {{ string_value: "{rate}" }} }}\n'
        )


def add_sub_copy(repository, name: str, rate: str | None) -> None:
    """The demo add_sub under another name, opted in at `rate` (None: parameter absent)."""
    shutil.copytree(demo_repository() / "add_sub", repository / name)
    config = repository / name / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "add_sub"', f'name: "{name}"'))
    if rate is not None:
        opt_in(repository, name, rate)


@pytest.fixture(scope="module")
def logged_server(tmp_path_factory, frontend):
    yield from serve_logged(tmp_path_factory.mktemp("payload_log"), frontend)


def serve_logged(root, frontend: str):
    """Fixture body: a server whose models opt in to payload logging at various rates."""
    repository = root / "models"
    repository.mkdir()
    add_sub_copy(repository, "logged", "1")
    add_sub_copy(repository, "zero", "0")
    add_sub_copy(repository, "unlogged", None)
    add_sub_copy(repository, "sampled", "0.25")
    add_sub_copy(repository, "rotated", "1.0")
    add_sub_copy(repository, "bad_rate", "1.5")
    write_identity_model(repository, "texts", "BYTES")
    opt_in(repository, "texts")
    write_identity_model(repository, "long", "FP32")
    opt_in(repository, "long")
    copy_model(repository, "fails_on_value")
    opt_in(repository, "fails_on_value")
    process = ConvoyProcess(
        repository,
        root / "server.log",
        extra_args=(
            "--payload-log-dir",
            str(root / "payloads"),
            "--payload-log-max-bytes",
            str(MAX_BYTES),
            "--payload-log-backups",
            str(BACKUPS),
            "--payload-log-max-elements",
            str(MAX_ELEMENTS),
        ),
        frontend=frontend,
    )
    process.payload_dir = root / "payloads"
    # bad_rate fails to load, so the server never reports ready: wait for liveness.
    yield from serve_until_stopped(process, "live")


def counters(server: ConvoyProcess) -> dict[tuple[str, str], float]:
    """{("written" | "dropped", model): value} from the server's /metrics."""
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).text
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("convoy_payload_log_written", "convoy_payload_log_dropped"):
            kind = family.name.rsplit("_", 1)[1]
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[(kind, sample.labels["model"])] = sample.value
    return found


def wait_written(server: ConvoyProcess, model: str, count: int) -> None:
    poll(
        lambda: counters(server).get(("written", model), 0) >= count,
        f"{count} payload lines of '{model}' written",
    )


def lines(path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def add_sub_inputs(module, seed: int):
    a = np.arange(16, dtype=np.float32).reshape(1, 16) + seed
    b = np.full((1, 16), 0.5 * seed, dtype=np.float32)
    tensors = []
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        tensor = module.InferInput(name, [1, 16], "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return a, b, tensors


def test_rate_one_logs_every_request_with_its_payload_over_http_and_grpc(logged_server):
    sent = {}
    http = httpclient.InferenceServerClient(logged_server.http_url)
    grpc = grpcclient.InferenceServerClient(logged_server.grpc_url)
    try:
        for seed in range(3):
            for protocol, client, module in (("http", http, httpclient), ("grpc", grpc, grpcclient)):
                a, b, tensors = add_sub_inputs(module, seed)
                request_id = f"{protocol}-{seed}"
                client.infer("logged", tensors, request_id=request_id)
                sent[request_id] = (a, b)
    finally:
        http.close()
        grpc.close()
    wait_written(logged_server, "logged", len(sent))
    logged = {line["id"]: line for line in lines(logged_server.payload_dir / "logged.jsonl")}
    assert set(logged) == set(sent)
    for request_id, (a, b) in sent.items():
        line = logged[request_id]
        assert line["model"] == "logged"
        assert line["version"] == "1"
        assert line["status"] == "success"
        assert "error" not in line
        datetime.fromisoformat(line["timestamp"])
        assert line["latency_us"] >= line["compute_us"] >= 0
        assert line["queue_us"] >= 0
        inputs = {t["name"]: t for t in line["inputs"]}
        outputs = {t["name"]: t for t in line["outputs"]}
        for name, array in (("INPUT0", a), ("INPUT1", b), ("OUTPUT0", a + b), ("OUTPUT1", a - b)):
            tensor = inputs.get(name) or outputs[name]
            assert tensor["datatype"] == "FP32"
            assert tensor["shape"] == [1, 16]
            assert tensor["data"] == array.reshape(-1).tolist()


def test_bytes_are_logged_as_strings_or_base64_when_not_utf8(logged_server):
    client = httpclient.InferenceServerClient(logged_server.http_url)
    try:
        cases = (("text", [b"hello", "gr\u00fc\u00df".encode()]), ("raw", [b"\xff\x00"]))
        for request_id, items in cases:
            tensor = httpclient.InferInput("INPUT0", [1, len(items)], "BYTES")
            tensor.set_data_from_numpy(np.array([items], dtype=object))
            client.infer("texts", [tensor], request_id=request_id)
    finally:
        client.close()
    wait_written(logged_server, "texts", 2)
    logged = {line["id"]: line for line in lines(logged_server.payload_dir / "texts.jsonl")}
    for key in ("inputs", "outputs"):
        assert logged["text"][key][0]["data"] == ["hello", "gr\u00fc\u00df"]
        assert logged["raw"][key][0]["data_base64"] == ["/wA="]
        assert "data" not in logged["raw"][key][0]


def test_large_tensors_are_cut_and_marked_truncated(logged_server):
    values = np.arange(MAX_ELEMENTS + 36, dtype=np.float32).reshape(1, -1)
    client = grpcclient.InferenceServerClient(logged_server.grpc_url)
    try:
        tensor = grpcclient.InferInput("INPUT0", list(values.shape), "FP32")
        tensor.set_data_from_numpy(values)
        client.infer("long", [tensor], request_id="long")
    finally:
        client.close()
    wait_written(logged_server, "long", 1)
    (line,) = lines(logged_server.payload_dir / "long.jsonl")
    for tensor in (line["inputs"][0], line["outputs"][0]):
        assert tensor["truncated"] is True
        assert tensor["elements"] == values.size
        assert tensor["shape"] == list(values.shape)
        assert tensor["data"] == values.reshape(-1)[:MAX_ELEMENTS].tolist()


def test_failed_requests_are_logged_with_their_error(logged_server):
    client = httpclient.InferenceServerClient(logged_server.http_url)
    try:
        tensor = httpclient.InferInput("INPUT0", [1, 2], "INT32")
        tensor.set_data_from_numpy(np.array([[1, 13]], dtype=np.int32))
        with pytest.raises(Exception, match="refusing the value 13"):
            client.infer("fails_on_value", [tensor], request_id="fails")
    finally:
        client.close()
    wait_written(logged_server, "fails_on_value", 1)
    (line,) = lines(logged_server.payload_dir / "fails_on_value.jsonl")
    assert line["id"] == "fails"
    assert line["status"] == "error"
    assert "refusing the value 13" in line["error"]
    assert line["inputs"][0]["data"] == [1, 13]
    assert line["outputs"] == []


def test_rate_zero_or_absent_logs_nothing(logged_server):
    client = httpclient.InferenceServerClient(logged_server.http_url)
    try:
        for model in ("zero", "unlogged"):
            for seed in range(5):
                client.infer(model, add_sub_inputs(httpclient, seed)[2])
        # The writer keeps order: once a later logged request is written, anything the others
        # had queued would have been written too.
        client.infer("logged", add_sub_inputs(httpclient, 9)[2], request_id="barrier")
    finally:
        client.close()
    poll(
        lambda: "barrier" in {line["id"] for line in lines(logged_server.payload_dir / "logged.jsonl")},
        "the barrier request logged",
    )
    assert not (logged_server.payload_dir / "zero.jsonl").exists()
    assert not (logged_server.payload_dir / "unlogged.jsonl").exists()
    seen = counters(logged_server)
    assert ("written", "zero") not in seen and ("written", "unlogged") not in seen


def test_fractional_rate_logs_that_fraction_of_requests(logged_server):
    client = grpcclient.InferenceServerClient(logged_server.grpc_url)
    try:
        for index in range(40):
            client.infer("sampled", add_sub_inputs(grpcclient, index)[2], request_id=str(index))
    finally:
        client.close()
    wait_written(logged_server, "sampled", 10)
    logged = [line["id"] for line in lines(logged_server.payload_dir / "sampled.jsonl")]
    # Count-based sampling at 0.25: every fourth request, exactly.
    assert logged == [str(i) for i in range(3, 40, 4)]


@pytest.mark.frontends(FRONTENDS[0])
def test_catalog_shows_the_sample_rate_and_that_the_log_is_on(logged_server):
    document = requests.get(f"{logged_server.base_url}/catalog.json", timeout=5).json()
    (model,) = [m for m in document["models"] if m["name"] == "sampled"]
    assert model["payload_log_sample_rate"] == 0.25
    assert model["payload_log_on"] is True


def test_invalid_sample_rate_fails_the_model_naming_the_parameter(logged_server):
    index = requests.post(f"{logged_server.base_url}/v2/repository/index", timeout=5).json()
    (row,) = [r for r in index if r["name"] == "bad_rate"]
    assert row["state"] == "UNAVAILABLE"
    assert "parameters.payload_log_sample_rate" in row["reason"]
    assert "between 0 and 1, got '1.5'" in row["reason"]


def test_rotation_keeps_the_newest_lines_in_the_configured_backups(logged_server):
    client = httpclient.InferenceServerClient(logged_server.http_url)
    total = 80  # about 600 bytes a line: several rotations at MAX_BYTES
    try:
        for index in range(total):
            client.infer("rotated", add_sub_inputs(httpclient, index)[2], request_id=str(index))
    finally:
        client.close()
    wait_written(logged_server, "rotated", total)
    directory = logged_server.payload_dir
    files = [directory / "rotated.jsonl.2", directory / "rotated.jsonl.1", directory / "rotated.jsonl"]
    assert not (directory / f"rotated.jsonl.{BACKUPS + 1}").exists()
    kept = []
    for path in files:
        assert path.stat().st_size <= MAX_BYTES, path
        kept.extend(int(line["id"]) for line in lines(path))
    # Oldest lines went with the rotations; what is kept is the newest, in order, without gaps.
    assert 0 < len(kept) < total
    assert kept == list(range(total - len(kept), total))


@pytest.fixture
def blocked_server(tmp_path):
    """Payload log whose file is a FIFO nobody reads yet: its writer blocks on the first line."""
    repository = tmp_path / "models"
    repository.mkdir()
    add_sub_copy(repository, "logged", "1")
    payloads = tmp_path / "payloads"
    payloads.mkdir()
    os.mkfifo(payloads / "logged.jsonl")
    process = ConvoyProcess(
        repository,
        tmp_path / "server.log",
        extra_args=("--payload-log-dir", str(payloads), "--payload-log-queue-size", str(QUEUE_SIZE)),
    )
    process.payload_dir = payloads
    yield from serve_until_stopped(process)


def test_full_queue_drops_and_counts_while_requests_succeed(blocked_server):
    total = 20
    client = grpcclient.InferenceServerClient(blocked_server.grpc_url)
    try:
        for index in range(total):
            a, b, tensors = add_sub_inputs(grpcclient, index)
            result = client.infer("logged", tensors, request_id=str(index))
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    finally:
        client.close()
    # The writer holds at most one line (blocked writing it) and the queue QUEUE_SIZE more.
    dropped = poll(
        lambda: (
            counters(blocked_server).get(("dropped", "logged"), 0) >= total - QUEUE_SIZE - 1
            and counters(blocked_server)[("dropped", "logged")]
        ),
        "dropped payload lines counted",
    )
    assert dropped <= total - QUEUE_SIZE
    assert counters(blocked_server).get(("written", "logged"), 0) == 0
    # Unblock the writer: the lines it kept come out, and the counters add up.
    reader = os.open(blocked_server.payload_dir / "logged.jsonl", os.O_RDONLY | os.O_NONBLOCK)
    received = bytearray()

    def read_all() -> bool:
        with contextlib.suppress(BlockingIOError):
            received.extend(os.read(reader, 1 << 16))
        return received.count(b"\n") == total - dropped

    try:
        poll(read_all, "the queued payload lines")
        wait_written(blocked_server, "logged", total - dropped)
        ids = [orjson.loads(line)["id"] for line in bytes(received).splitlines()]
        assert len(set(ids)) == len(ids) == total - dropped
    finally:
        os.close(reader)
