"""Shared test helpers: building model repositories and running a real `convoy serve` process.

Imported as `helpers` (pyproject puts tests/ on pythonpath); fixtures live in conftest.py.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import requests

from convoy.cli import demo_repository
from convoy.datatypes import V2_TO_CONFIG

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
MODEL_SOURCES = TESTS / "models"

#: Every Open Inference Protocol datatype; each gets an identity model named identity_<lower>.
DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
)

#: Triton's model control for servers whose tests load and unload models: every model loads at
#: start, and the repository API takes load and unload requests (refused in the other modes).
EXPLICIT = ("--model-control-mode", "explicit", "--load-model", "*")

STARTUP_DEADLINE_S = 60.0

#: The front ends the protocol suites (e2e, security, python_backend, reliability) run against,
#: each test once per front end (the `frontend` parameter, see conftest.py's
#: pytest_generate_tests); CONVOY_TEST_FRONTENDS narrows it.
FRONTENDS = tuple(
    name for name in os.environ.get("CONVOY_TEST_FRONTENDS", "native,python").split(",") if name
)
#: A `frontend` value that is not a front end but a server shape: `convoy serve --workers 2`, an
#: engine behind two (Python) front-end processes. Suites whose answers must not depend on the
#: process split take it with `@pytest.mark.frontends(*WITH_WORKERS)`.
WORKERS_FRONTEND = "workers"
WORKER_FLAGS = ("--workers", "2")
WITH_WORKERS = (*FRONTENDS, WORKERS_FRONTEND)
SHUTDOWN_DEADLINE_S = 30.0

_SERVING = re.compile(r"^convoy: serving .* http=(\d+) grpc=(\d+) metrics=(-?\d+)$")


def identity_model_name(datatype: str) -> str:
    return f"identity_{datatype.lower()}"


def write_identity_model(repository: Path, name: str, datatype: str) -> None:
    """A batching (max_batch_size 8) identity model on one variable-length `datatype` vector."""
    config_type = V2_TO_CONFIG[datatype]
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(
        f'name: "{name}"\n'
        'backend: "python"\n'
        "max_batch_size: 8\n"
        f'input [ {{ name: "INPUT0", data_type: {config_type}, dims: [ -1 ] }} ]\n'
        f'output [ {{ name: "OUTPUT0", data_type: {config_type}, dims: [ -1 ] }} ]\n'
    )
    shutil.copy(MODEL_SOURCES / "identity" / "model.py", model_dir / "1" / "model.py")


def copy_model(repository: Path, name: str) -> None:
    shutil.copytree(MODEL_SOURCES / name, repository / name)


def build_serving_repository(repository: Path) -> Path:
    """Models that all load: the server over this repository must report ready."""
    repository.mkdir(parents=True, exist_ok=True)
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    for datatype in DATATYPES:
        write_identity_model(repository, identity_model_name(datatype), datatype)
    # Unloaded and loaded again by the repository tests; nothing else touches it.
    write_identity_model(repository, "reloadable", "INT32")
    for name in ("fixed_shape", "versioned_all", "versioned_latest", "fails_on_value"):
        copy_model(repository, name)
    return repository


def build_broken_repository(repository: Path) -> Path:
    """add_sub beside a model that fails to import and one whose config.pbtxt is invalid."""
    repository.mkdir(parents=True, exist_ok=True)
    shutil.copytree(demo_repository() / "add_sub", repository / "add_sub")
    for name in ("broken_import", "bad_config"):
        copy_model(repository, name)
    return repository


@dataclass
class ConvoyProcess:
    """`python -m convoy serve` on a repository, every port chosen by the OS (port 0)."""

    repository: Path
    log_path: Path
    extra_args: tuple[str, ...] = ()
    #: "https" for a server started with --tls-cert; `health_request`: keyword arguments for
    #: the start-up health poll's requests.get (headers= for a key, verify=/cert= for TLS).
    scheme: str = "http"
    health_request: dict = field(default_factory=dict)
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    stdout_lines: list[str] = field(default_factory=list)
    #: "native" or "python": --frontend for this server ("": the default, native when built);
    #: "workers" (WORKERS_FRONTEND): --workers 2 instead. A server with --workers N runs Python
    #: front ends whatever this says.
    frontend: str = ""
    _process: subprocess.Popen | None = None
    _log: IO[str] | None = None
    _lines: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.http_url}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, wait_until: str = "ready") -> None:
        """Start and wait for the `serving` line, then for /v2/health/<wait_until> to answer 200."""
        self._log = self.log_path.open("w")
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "convoy",
                "serve",
                "--model-repository",
                str(self.repository),
                "--host",
                "127.0.0.1",
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                "--metrics-port",
                "0",
                *self.extra_args,
                *self._frontend_args(),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while not self.http_port:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise AssertionError(f"no 'serving' line within {STARTUP_DEADLINE_S}s\n{self.log()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"server exited during start-up\n{self.log()}")
            found = _SERVING.match(line)
            if found:
                self.http_port, self.grpc_port, self.metrics_port = map(int, found.groups())
        self._wait_for_health(wait_until, deadline)

    def _frontend_args(self) -> tuple[str, ...]:
        if self.frontend == WORKERS_FRONTEND:
            return WORKER_FLAGS
        if not self.frontend or "--workers" in self.extra_args:
            return ()
        return ("--frontend", self.frontend)

    def _read_stdout(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _wait_for_health(self, which: str, deadline: float) -> None:
        pause = threading.Event()  # never set: wait() paces the polling
        last = ""
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise AssertionError(f"server exited with {self._process.returncode}\n{self.log()}")
            try:
                answer = requests.get(
                    f"{self.base_url}/v2/health/{which}", timeout=2, **self.health_request
                )
                if answer.status_code == 200:
                    return
                last = f"HTTP {answer.status_code}"
            except requests.ConnectionError as exc:  # includes requests.exceptions.SSLError
                last = str(exc)
            pause.wait(0.05)
        self.kill()
        raise AssertionError(f"/v2/health/{which} not 200 before the deadline ({last})\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed and reported as -9 past the deadline)."""
        if self._process is None:
            return 0
        self._process.send_signal(signal.SIGTERM)
        try:
            code = self._process.wait(timeout=SHUTDOWN_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.kill()
            code = -9
        self._log.close()
        return code

    def send_signal(self, sig: int) -> None:
        assert self._process is not None and self._process.poll() is None, "server not running"
        self._process.send_signal(sig)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def log(self) -> str:
        """Server stderr and stdout, for failure messages."""
        if self._log is not None and not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return "--- stdout ---\n" + "\n".join(self.stdout_lines) + "\n--- stderr ---\n" + text[-8000:]


#: gRPC status-code name -> the HTTP status the same error gets.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "UNIMPLEMENTED": 501,
    "ALREADY_EXISTS": 400,
}


@dataclass
class Protocol:
    """One tritonclient flavour (grpc or http) behind the calls the e2e tests make."""

    name: str
    client: object
    module: object
    #: host:port of the server for this protocol (for tests that open more clients).
    url: str = ""

    def status(self, grpc_code: str) -> str:
        """What InferenceServerException.status() says for this error on this protocol."""
        if self.name == "grpc":
            return f"StatusCode.{grpc_code}"
        return str(HTTP_STATUS[grpc_code])

    def input(self, name: str, array, datatype: str, binary: bool = True):
        tensor = self.module.InferInput(name, list(array.shape), datatype)
        if self.name == "http":
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        return tensor

    def output(self, name: str, binary: bool = True):
        if self.name == "http":
            return self.module.InferRequestedOutput(name, binary_data=binary)
        return self.module.InferRequestedOutput(name)

    def statistics(self, model: str, version: str = "") -> dict:
        """{version: {"inference_count": int, "execution_count": int, ...}} for one model."""
        if self.name == "grpc":
            answer = self.client.get_inference_statistics(model, version, as_json=True)
        else:
            answer = self.client.get_inference_statistics(model, version)
        return {
            row["version"]: {
                "inference_count": int(row.get("inference_count", 0)),
                "execution_count": int(row.get("execution_count", 0)),
                "success": int(row.get("inference_stats", {}).get("success", {}).get("count", 0)),
                "fail": int(row.get("inference_stats", {}).get("fail", {}).get("count", 0)),
            }
            for row in answer.get("model_stats", [])
        }

    def model_config(self, model: str, version: str = "") -> dict:
        if self.name == "grpc":
            return self.client.get_model_config(model, version, as_json=True)["config"]
        return self.client.get_model_config(model, version)

    def model_metadata(self, model: str, version: str = "") -> dict:
        if self.name == "grpc":
            return self.client.get_model_metadata(model, version, as_json=True)
        return self.client.get_model_metadata(model, version)

    def server_metadata(self) -> dict:
        if self.name == "grpc":
            return self.client.get_server_metadata(as_json=True)
        return self.client.get_server_metadata()

    def repository_index(self) -> list[dict]:
        if self.name == "grpc":
            return self.client.get_model_repository_index(as_json=True).get("models", [])
        return self.client.get_model_repository_index()


def sample_tensor(datatype: str, json_safe: bool = False):
    """A [2, 3] tensor of `datatype` with edge values (extremes, -0.0, inf, nan unless json_safe).

    BF16 comes as ml_dtypes.bfloat16 (what tritonclient sends); BYTES as an object array.
    """
    import ml_dtypes
    import numpy as np

    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BYTES":
        items = [b"", b"abc", "gr\u00fc\u00df".encode(), b"a b", b"x" * 300, b"\x00\xff\x01"]
        if json_safe:
            items[-1] = b"tab\tand newline\n"
        return np.array(items, dtype=object).reshape(2, 3)
    if datatype == "BF16":
        return np.array([[1.0, -2.5, 0.0], [-0.0, 3.0e38, float("inf")]], dtype=ml_dtypes.bfloat16)
    dtype = np.dtype(datatype.lower().replace("fp", "float"))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0], [1, info.max - 1, 42]], dtype=dtype)
    info = np.finfo(dtype)
    if json_safe:
        values = [[-1.5, 0.0, float(info.tiny)], [float(info.max), -float(info.max), 0.1]]
    else:
        values = [[-0.0, float(info.tiny), float(info.max)], [float("inf"), float("-inf"), float("nan")]]
    return np.array(values, dtype=dtype)


def assert_same_tensor(result, expected, datatype: str) -> None:
    """Equal shape and, bit for bit, equal contents (BYTES: equal elements as bytes)."""
    assert result is not None, "output missing from the response"
    assert tuple(result.shape) == tuple(expected.shape)
    if datatype == "BYTES":
        as_bytes = [v.encode() if isinstance(v, str) else bytes(v) for v in result.reshape(-1)]
        assert as_bytes == list(expected.reshape(-1))
        return
    assert result.dtype.itemsize == expected.dtype.itemsize
    assert result.tobytes() == expected.tobytes(), f"{result!r} != {expected!r}"


def serve_until_stopped(process: ConvoyProcess, wait_until: str = "ready"):
    """Fixture body: start the server, yield it, then SIGTERM it and require exit code 0."""
    process.start(wait_until)
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, f"server exited with {code} on SIGTERM\n{process.log()}"


def open_protocol(name: str, process: ConvoyProcess, http_concurrency: int = 8):
    """Fixture body: a tritonclient of flavour `name` ("grpc" or "http") on the server."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    if name == "grpc":
        client = grpcclient.InferenceServerClient(process.grpc_url)
        module = grpcclient
    else:
        client = httpclient.InferenceServerClient(process.http_url, concurrency=http_concurrency)
        module = httpclient
    try:
        url = process.grpc_url if name == "grpc" else process.http_url
        yield Protocol(name, client, module, url)
    finally:
        client.close()


def poll(condition, what: str, timeout: float = 30.0):
    """Call `condition` until it returns something truthy (returned), or fail after `timeout`
    seconds naming `what`. The only way tests wait: never a fixed sleep."""
    pause = threading.Event()  # never set: wait() paces the polling
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        pause.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def metric_value(process: ConvoyProcess, name: str, headers: dict | None = None, **labels: str) -> float:
    """One sample from the server's /metrics (0 when the sample is absent); `headers`: a scrape
    key's, for a server with API keys (/metrics is protected then)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{process.metrics_port}/metrics"
    answer = requests.get(url, headers=headers, timeout=10)
    assert answer.status_code == 200, f"/metrics answered {answer.status_code}"
    text = answer.text
    wanted = labels.items()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and wanted <= sample.labels.items():
                return sample.value
    return 0.0
