"""Fixtures for the reliability tests: a server over a small repository of capacity-bounded models.

`capacity` batches up to 4 rows and holds each batch for a fixed time, so the model, not the
front ends, is the bottleneck; its queue is small and has a default timeout, so overload shows
as explicit RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FRONTENDS, ConvoyProcess, serve_until_stopped, write_identity_model

#: Each batch costs BATCH_SECONDS whatever its size: capacity is about 4 / BATCH_SECONDS rows/s.
CAPACITY_MODEL = """
import time

import numpy as np


class Model:
    \"\"\"OUT = IN * 3 + 1 (a checksum the client can verify), after a fixed hold per batch.\"\"\"

    def execute(self, inputs):
        time.sleep({batch_seconds})
        return {{"OUT": inputs["IN"] * np.int64(3) + np.int64(1)}}
"""

CAPACITY_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 4
input [ {{ name: "IN", data_type: TYPE_INT64, dims: [ 4 ] }} ]
output [ {{ name: "OUT", data_type: TYPE_INT64, dims: [ 4 ] }} ]
dynamic_batching {{
  max_queue_delay_microseconds: 500
  default_queue_policy {{
    max_queue_size: 8
    default_timeout_microseconds: {timeout_us}
    timeout_action: REJECT
  }}
}}
"""


def write_capacity_model(
    repository: Path, name: str, batch_seconds: float, timeout_us: int = 30_000
) -> None:
    model = repository / name
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(CAPACITY_CONFIG.format(name=name, timeout_us=timeout_us))
    (model / "1" / "model.py").write_text(CAPACITY_MODEL.format(batch_seconds=batch_seconds))


@pytest.fixture(scope="session", params=FRONTENDS[:1])
def frontend(request) -> str:
    """The long tail (fuzzing, overload, admission, shutdown, schemathesis) runs against the
    first front end only, the native one by default, to keep CI inside its time: the Python
    front end's handling of these did not change with the native one beside it."""
    return request.param


@pytest.fixture(scope="session")
def reliability_server(tmp_path_factory, frontend):
    """One server for the overload and fuzzing tests (each leaves it serving)."""
    root = tmp_path_factory.mktemp("reliability")
    repository = root / "models"
    repository.mkdir()
    write_capacity_model(repository, "capacity", batch_seconds=0.02)
    for datatype in ("FP32", "BYTES", "INT64", "BOOL", "FP16", "BF16"):
        write_identity_model(repository, f"identity_{datatype.lower()}", datatype)
    process = ConvoyProcess(repository, root / "server.log", frontend=frontend)
    yield from serve_until_stopped(process, "ready")
