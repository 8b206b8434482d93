"""The reliability tests' capacity-bounded model: `capacity` batches up to 4 rows and holds each
batch for a fixed time, so the model, not the front ends, is the bottleneck; its queue is small
and has a default timeout, so overload shows as explicit RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED
answers. Imported by bare name (`capacity_models`, from this folder), never as `conftest`: a
second conftest module elsewhere in the run would stand in for it.
"""

from __future__ import annotations

from pathlib import Path

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
