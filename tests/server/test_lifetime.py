"""The server's lifetime: a start that fails midway closes what had started, in reverse, and
shutdown moves through its phases in order."""

from __future__ import annotations

import asyncio
import socket

import pytest
from helpers import write_identity_model

from convoy.config import ServerConfig
from convoy.engine.client import ShutdownPhase
from convoy.server.app import ConvoyServer


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("frontend", ["python", "native"])
def test_a_start_failing_after_the_models_loaded_unloads_them_and_closes_the_ports(tmp_path, frontend):
    """The metrics port is taken: the front ends are listening and the model loaded by then;
    both are closed again, and the engine ends STOPPED."""
    write_identity_model(tmp_path, "identity_fp32", "FP32")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = ServerConfig(
            model_repository=tmp_path,
            host="127.0.0.1",
            http_port=0,
            grpc_port=0,
            metrics_port=taken.getsockname()[1],
            frontend=frontend,
        )
        server = ConvoyServer(settings)
        states: list[dict[str, str]] = []
        server.engine.watch_models(
            lambda: states.append({n: m.state for n, m in server.engine.models().items()})
        )

        async def start() -> None:
            async with server:
                pytest.fail("the server started on a taken metrics port")

        with pytest.raises(OSError):
            asyncio.run(start())
    assert {"identity_fp32": "READY"} in states
    assert dict(server.engine.models()) == {}
    assert server.engine.phase is ShutdownPhase.STOPPED
    assert server.http_port and server.grpc_port
    assert _refused(server.http_port) and _refused(server.grpc_port)


def test_the_shutdown_phase_only_moves_forward(tmp_path):
    server = ConvoyServer(ServerConfig(model_repository=tmp_path))
    engine = server.engine
    assert engine.phase is ShutdownPhase.SERVING and engine.accepting and not engine.refusing
    engine.enter(ShutdownPhase.DRAINING)
    assert not engine.accepting and not engine.refusing
    engine.enter(ShutdownPhase.STOPPING)
    engine.enter(ShutdownPhase.DRAINING)  # a later step reached again does not undo it
    assert engine.phase is ShutdownPhase.STOPPING and engine.refusing
