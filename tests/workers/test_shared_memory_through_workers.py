"""A shared-memory region registered through one --workers front end serves requests arriving
at every front end (the engine's registry is the server's; each worker mirrors it)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from helpers import WORKERS_FRONTEND, metric_value, poll

pytestmark = pytest.mark.frontends(WORKERS_FRONTEND)

ROWS = 1
TENSOR_BYTES = ROWS * 16 * 4


def _worker_requests(server) -> list[float]:
    return [metric_value(server, "convoy_worker_requests_total", worker=str(i)) for i in range(2)]


def test_a_region_registered_through_one_worker_serves_through_both(server):
    tag = f"workers_{os.getpid()}"
    handle = shm.create_shared_memory_region(f"in_{tag}", f"/convoy_in_{tag}", 2 * TENSOR_BYTES)
    a = np.arange(16, dtype=np.float32).reshape(ROWS, 16)
    shm.set_shared_memory_region(handle, [a, a])
    registrar = grpcclient.InferenceServerClient(server.grpc_url)
    registrar.register_system_shared_memory(f"in_{tag}", f"/convoy_in_{tag}", 2 * TENSOR_BYTES)
    before = _worker_requests(server)
    answers = []

    def infer_on_a_new_connection() -> bool:
        client = httpclient.InferenceServerClient(server.http_url)  # a new connection each time
        try:
            inputs = []
            for index, name in enumerate(("INPUT0", "INPUT1")):
                tensor = httpclient.InferInput(name, [ROWS, 16], "FP32")
                tensor.set_shared_memory(f"in_{tag}", TENSOR_BYTES, index * TENSOR_BYTES)
                inputs.append(tensor)
            answers.append(client.infer("add_sub", inputs).as_numpy("OUTPUT0"))
        finally:
            client.close()
        after = _worker_requests(server)
        return all(later > earlier for later, earlier in zip(after, before, strict=True))

    try:
        poll(infer_on_a_new_connection, "requests through both workers", timeout=60)
        for answer in answers:
            np.testing.assert_array_equal(answer, a + a)
        # Unregistered through the other protocol (likely another worker): gone everywhere.
        http = httpclient.InferenceServerClient(server.http_url)
        http.unregister_system_shared_memory(f"in_{tag}")
        assert registrar.get_system_shared_memory_status().regions == {}
        http.close()
    finally:
        registrar.unregister_system_shared_memory()
        registrar.close()
        shm.destroy_shared_memory_region(handle)
