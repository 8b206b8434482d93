"""Each installed peer starts on free loopback ports, answers one request with Convoy's exact
MLP output over HTTP JSON and gRPC, and leaves no process behind. Skipped (with the install
command) where .peers/<name> is missing, as in CI, which never installs peers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from peers import PEERS, installed, missing_reason
from peers.launch import serve
from peers.mlp import forward, load_layers
from workloads import MLP_MAX_BATCH_SIZE, MLP_MAX_QUEUE_DELAY_US, mlp_weights, mlp_weights_path


def requires(name: str):
    return pytest.mark.skipif(not installed(PEERS[name]), reason=f"{name} {missing_reason(PEERS[name])}")


@pytest.mark.parametrize("name", [pytest.param(name, marks=requires(name)) for name in PEERS])
def test_peer_serves_the_mlp_over_http_json_and_grpc_then_stops_its_process_group(name, tmp_path):
    weights = mlp_weights_path(tmp_path / "models")
    weights.parent.mkdir(parents=True)
    np.savez(weights, **mlp_weights())
    rows = np.random.default_rng(5).standard_normal((1, 64)).astype(np.float32)
    expected = forward(load_layers(weights), rows.copy())

    with serve(
        PEERS[name], weights, MLP_MAX_BATCH_SIZE, MLP_MAX_QUEUE_DELAY_US, tmp_path / name
    ) as running:
        http = httpclient.InferenceServerClient(f"127.0.0.1:{running.http_port}")
        tensor = httpclient.InferInput("INPUT0", [1, 64], "FP32")
        tensor.set_data_from_numpy(rows, binary_data=False)
        answer = http.infer(
            "mlp", [tensor], outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)]
        )
        http.close()
        # JSON carries float32 values through decimal text: equal to float32 precision.
        np.testing.assert_allclose(answer.as_numpy("OUTPUT0"), expected, rtol=1e-6, atol=1e-7)

        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{running.grpc_port}")
        tensor = grpcclient.InferInput("INPUT0", [1, 64], "FP32")
        tensor.set_data_from_numpy(rows)
        answer = grpc.infer("mlp", [tensor], outputs=[grpcclient.InferRequestedOutput("OUTPUT0")])
        grpc.close()
        assert answer.as_numpy("OUTPUT0").tobytes() == expected.tobytes()
        group = running.pid

    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # nothing of the peer (tritonserver, backend stubs) is left
