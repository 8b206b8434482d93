"""Echo that reports its process id, and crashes its process on request."""

import ctypes
import os
import time
from pathlib import Path

import numpy as np


class Poisoned(RuntimeError):
    """Stands for an error after which the process cannot be trusted (a lost CUDA context)."""


class Model:
    fatal_errors = (Poisoned,)

    def initialize(self, config: dict) -> None:
        self.root = Path(config["path"]).parent

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = inputs["INPUT0"]
        if (values == 11).any():
            ctypes.string_at(0)  # a real segmentation fault in native code
        if (values == 7).any():
            os._exit(7)
        if (values == 13).any():
            raise ValueError("refusing the value 13")
        if (values == 5).any():
            # Busy until killed: announces its pid in the file `busy`, then waits (30 s at most).
            (self.root / "busy").write_text(str(os.getpid()))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.01)
        if (values == 99).any():
            raise Poisoned("CUDA error: device-side assert triggered (simulated)")
        pid = np.full((values.shape[0], 1), os.getpid(), dtype=np.int64)
        return {"OUTPUT0": values, "PID": pid}
