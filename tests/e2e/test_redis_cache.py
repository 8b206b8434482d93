"""The Redis response cache against Debian's redis-server: two Convoy replicas share its
entries (one computes, the other answers from it), entries carry a TTL, and a Redis that goes
away fails open (requests are computed, the failures counted and logged, not raised)."""

from __future__ import annotations

import shutil
import socket
import subprocess

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import ConvoyProcess, metric_value, poll, serve_until_stopped

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS is None, reason="redis-server is not installed (.ci/run installs Debian's package)"
)

MODEL = """
import numpy as np


class Model:
    def execute(self, inputs):
        return {"OUT": inputs["IN"] * 2}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """redis-server on a free loopback port, no persistence, in a temporary folder."""

    def __init__(self, folder) -> None:
        self.port = _free_port()
        self.folder = folder
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                REDIS,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        poll(self._answers, "redis-server to answer")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *words: str) -> bytes:
        payload = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload.encode())
            return sock.recv(65536)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def _repository(root):
    folder = root / "models" / "doubled"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text(MODEL)
    (folder / "config.pbtxt").write_text(
        'name: "doubled"\nbackend: "python"\nmax_batch_size: 8\n'
        'input [ { name: "IN", data_type: TYPE_FP32, dims: [ 4 ] } ]\n'
        'output [ { name: "OUT", data_type: TYPE_FP32, dims: [ 4 ] } ]\n'
        "dynamic_batching { }\nresponse_cache { enable: true }\n"
        'parameters { key: "response_cache_ttl_s" value { string_value: "120" } }\n'
    )
    return root / "models"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, redis_server, frontend):
    flags = ("--cache-config", f"redis,host=127.0.0.1,port={redis_server.port}")
    first_root = tmp_path_factory.mktemp("replica-a")
    second_root = tmp_path_factory.mktemp("replica-b")
    # The same model files in two folders (two pods): the revision is by content, so they agree.
    first = ConvoyProcess(_repository(first_root), first_root / "server.log", flags, frontend=frontend)
    second = ConvoyProcess(
        _repository(second_root), second_root / "server.log", flags, frontend=frontend
    )
    a = serve_until_stopped(first)
    b = serve_until_stopped(second)
    yield next(a), next(b)
    for generator in (b, a):
        with pytest.raises(StopIteration):
            next(generator)


def _infer(process: ConvoyProcess, data: np.ndarray) -> tuple[np.ndarray, str]:
    client = grpcclient.InferenceServerClient(process.grpc_url)
    try:
        tensor = grpcclient.InferInput("IN", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        result = client.infer("doubled", [tensor])
        return result.as_numpy("OUT"), result.get_response().parameters["convoy-cache"].string_param
    finally:
        client.close()


def test_a_replica_answers_from_what_another_computed(replicas, redis_server):
    first, second = replicas
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    answer, marker = _infer(first, data)
    assert marker == "miss"
    poll(lambda: redis_server.command("DBSIZE").startswith(b":2"), "both rows to reach redis")
    again, marker = _infer(second, data)
    assert marker == "hit"
    np.testing.assert_array_equal(again, answer)
    assert metric_value(second, "nv_inference_exec_count", model="doubled") == 0
    assert metric_value(second, "nv_cache_num_hits_per_model", model="doubled") == 1


def test_entries_carry_the_models_ttl(replicas, redis_server):
    keys = redis_server.command("KEYS", "convoy:cache:*").split(b"\r\n")
    key = next(k for k in keys if k.startswith(b"convoy:cache:")).decode()
    ttl = int(redis_server.command("TTL", key)[1:].split(b"\r\n")[0])
    assert 0 < ttl <= 120


def test_a_redis_that_goes_away_fails_open(replicas, redis_server):
    first, _ = replicas
    redis_server.stop()
    try:
        data = np.full((1, 4), 42, dtype=np.float32)
        for _ in range(3):
            answer, marker = _infer(first, data)
            assert marker == "miss"
            np.testing.assert_array_equal(answer, data * 2)
        errors = metric_value(first, "convoy_cache_errors_total", operation="get") + metric_value(
            first, "convoy_cache_skipped_total"
        )
        assert errors >= 3
        log = first.log()
        assert log.count("serving without the cache for now") == 1, "failures are logged once a minute"
    finally:
        redis_server.start()
