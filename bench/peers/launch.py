"""Start a peer serving the benchmark MLP on free loopback ports, wait until it is ready, stop it.

Each peer runs in its own process group from its own virtualenv; stopping sends SIGINT to the
group (both peers shut down cleanly on it), waits, then SIGKILLs whatever of the group is left,
so no tritonserver or python-backend stub outlives the benchmark, even on error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .catalogue import PEERS_DIR, Peer

HERE = Path(__file__).resolve().parent
START_DEADLINE_S = 180.0
STOP_DEADLINE_S = 30.0


@dataclass(frozen=True)
class RunningPeer:
    name: str
    model: str
    http_port: int
    grpc_port: int
    #: The peer's process group (its launcher's pid): gone once `serve` has returned.
    pid: int = 0
    #: PyTriton guards the statistics API (which perf_analyzer reads) with a token.
    access_token: str = ""

    def port(self, protocol: str) -> int:
        return self.grpc_port if protocol == "grpc" else self.http_port

    def perf_args(self, protocol: str) -> tuple[str, ...]:
        """perf_analyzer -H arguments carrying the token in the header Triton expects there."""
        if not self.access_token:
            return ()
        header = "triton-access-token"
        if protocol == "grpc":
            header = "triton-grpc-protocol-" + header
        return ("-H", f"{header}:{self.access_token}")


def free_port() -> int:
    """A port the OS says is free now (the peer binds it a moment later; good enough on loopback)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _libdir(python: Path) -> str:
    """The interpreter's LIBDIR: Triton's python-backend stub links libpython from there."""
    code = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"
    done = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def _pytriton(peer: Peer, base: Path, weights: Path, max_batch: int, delay_us: int, workdir: Path):
    http, grpc, token = free_port(), free_port(), secrets.token_hex(16)
    python = peer.python(base)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [_libdir(python), env.get("LD_LIBRARY_PATH")]))
    command = [
        str(python),
        str(HERE / "serve_pytriton.py"),
        "--weights", str(weights),
        "--http-port", str(http),
        "--grpc-port", str(grpc),
        "--metrics-port", str(free_port()),
        "--max-batch-size", str(max_batch),
        "--max-queue-delay-us", str(delay_us),
        "--access-token", token,
    ]  # fmt: skip
    return command, env, RunningPeer("pytriton", "mlp", http, grpc, access_token=token)


def _mlserver(peer: Peer, base: Path, weights: Path, max_batch: int, delay_us: int, workdir: Path):
    http, grpc = free_port(), free_port()
    model_dir = workdir / "mlp"
    model_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "host": "127.0.0.1",
        "http_port": http,
        "grpc_port": grpc,
        "metrics_endpoint": None,
        # The model runs in the server process, on its event loop, like Convoy's python backend
        # on its own thread; worker processes only add an IPC hop for a model this small.
        "parallel_workers": 0,
        "debug": False,
    }
    (workdir / "settings.json").write_text(json.dumps(settings))
    model = {
        "name": "mlp",
        "implementation": "serve_mlserver.MLPModel",
        "max_batch_size": max_batch,
        "max_batch_time": delay_us / 1e6,
        "parameters": {"uri": str(weights)},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(HERE)}
    command = [str(peer.venv(base) / "bin" / "mlserver"), "start", str(workdir)]
    return command, env, RunningPeer("mlserver", "mlp", http, grpc)


LAUNCHERS = {"pytriton": _pytriton, "mlserver": _mlserver}


def _ready(http_port: int, model: str) -> bool:
    try:
        for path in ("/v2/health/ready", f"/v2/models/{model}/ready"):
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=2) as answer:
                if answer.status != 200:
                    return False
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(process: subprocess.Popen) -> None:
    """SIGINT the process group, SIGKILL what is left of it after the deadline, and return once
    the group is empty (orphaned children are reaped by init a moment after they die)."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_DEADLINE_S)
    # Children (tritonserver, backend stubs) may outlive the launcher script.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + STOP_DEADLINE_S
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


@contextmanager
def serve(
    peer: Peer,
    weights: Path,
    max_batch_size: int,
    max_queue_delay_us: int,
    workdir: Path,
    base: Path = PEERS_DIR,
    extra_env: dict[str, str] | None = None,
) -> Iterator[RunningPeer]:
    """The peer serving the MLP from `weights` as model "mlp"; logs go to workdir/server.log.
    `extra_env` is added to its environment (the benchmark's BLAS thread count)."""
    workdir.mkdir(parents=True, exist_ok=True)
    command, env, running = LAUNCHERS[peer.name](
        peer, base, weights, max_batch_size, max_queue_delay_us, workdir
    )
    env.update(extra_env or {})
    log_path = workdir / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
        )
        try:
            pause = 0.1
            deadline = time.monotonic() + START_DEADLINE_S
            while not _ready(running.http_port, running.model):
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{peer.name} exited with {process.returncode} at start; see {log_path}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{peer.name} not ready within {START_DEADLINE_S:.0f}s; see {log_path}"
                    )
                time.sleep(pause)
            yield dataclasses.replace(running, pid=process.pid)
        finally:
            _stop(process)
