"""Echo that reports when its instance was initialized; raises a fatal-marked error on 99."""

import time

import numpy as np


class DeviceAssert(RuntimeError):
    """Stands for a CUDA device-side assert: the instance must be reloaded after it."""


class Model:
    fatal_errors = (DeviceAssert,)

    def initialize(self, config: dict) -> None:
        self.loaded_at = time.monotonic_ns()

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = inputs["INPUT0"]
        if (values == 99).any():
            raise DeviceAssert("device-side assert triggered (simulated)")
        if (values == 13).any():
            raise ValueError("refusing the value 13")
        loaded_at = np.full((values.shape[0], 1), self.loaded_at, dtype=np.int64)
        return {"OUTPUT0": values, "LOADED_AT": loaded_at}
