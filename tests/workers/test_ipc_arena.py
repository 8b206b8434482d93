"""Large inputs reach the engine through each front end's shared-memory arena (engine/arena.py):
under concurrent clients every answer is its own request's bytes, whether its tensor went
through the arena or (arena full) through the frame, and the engine really maps the arenas."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ConvoyProcess, build_serving_repository, serve_until_stopped
from worker_metrics import WORKERS

CLIENTS = 6
REQUESTS_PER_CLIENT = 12


@pytest.fixture(scope="module")
def small_arena_server(tmp_path_factory):
    """Workers with a 1 MiB arena each: 256 KiB to 1 MiB tensors from six clients fill it, so
    some go through shared memory and some fall back to the frame."""
    root = tmp_path_factory.mktemp("ipc-arena")
    process = ConvoyProcess(
        build_serving_repository(root / "models"),
        root / "server.log",
        (*WORKERS, "--ipc-arena-mb", "1"),
    )
    yield from serve_until_stopped(process, "ready")


def vector(seed: int) -> np.ndarray:
    """A row no other request carries: 64k to 256k FP32 elements, the seed in every one."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(64 * 1024, 256 * 1024))
    return (rng.standard_normal((1, count)) + seed * 1000).astype(np.float32)


def run_client(flavour: str, url: str, first_seed: int) -> list[str]:
    module = grpcclient if flavour == "grpc" else httpclient
    client = module.InferenceServerClient(url)
    problems = []
    try:
        for seed in range(first_seed, first_seed + REQUESTS_PER_CLIENT):
            array = vector(seed)
            tensor = module.InferInput("INPUT0", list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            result = client.infer("identity_fp32", [tensor], request_id=f"r{seed}")
            if not np.array_equal(result.as_numpy("OUTPUT0"), array):
                problems.append(f"request r{seed} ({flavour}) got bytes that are not its own")
    finally:
        client.close()
    return problems


def test_large_inputs_are_their_own_through_the_arena_and_the_fallback(small_arena_server):
    urls = {"grpc": small_arena_server.grpc_url, "http": small_arena_server.http_url}
    with ThreadPoolExecutor(CLIENTS) as pool:
        runs = [
            pool.submit(run_client, flavour, urls[flavour], 1 + index * REQUESTS_PER_CLIENT)
            for index, flavour in enumerate(["grpc", "http"] * (CLIENTS // 2))
        ]
        problems = [problem for run in runs for problem in run.result()]
    assert problems == []
    maps = Path(f"/proc/{small_arena_server.pid}/maps").read_text()
    arenas = {line.split()[-2] for line in maps.splitlines() if "/convoy-ipc-" in line}
    assert len(arenas) == 2, f"the engine should map one arena per front end: {arenas}"
