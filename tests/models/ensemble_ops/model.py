"""A small arithmetic step for ensemble tests; the parameter `op` picks what it does:
plus1 / scale2 (Y from X), sum (Y = A + B), fail_negative (Y = X, fails on a negative value),
batch_id (Y = X and BATCH_ID = a number unique to the batch each row rode in).
The parameter `delay_ms` makes each batch take that long."""

import itertools
import time

import numpy as np


class Model:
    def initialize(self, config: dict) -> None:
        self.op = config["parameters"]["op"]
        self.delay = float(config["parameters"].get("delay_ms", "0")) / 1000
        self.batches = itertools.count(1)

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.delay:
            time.sleep(self.delay)
        if self.op == "sum":
            return {"Y": inputs["A"] + inputs["B"]}
        x = inputs["X"]
        if self.op == "plus1":
            return {"Y": x + 1}
        if self.op == "scale2":
            return {"Y": x * 2}
        if self.op == "fail_negative":
            if (x < 0).any():
                raise ValueError("negative input")
            return {"Y": x}
        if self.op == "batch_id":
            batch = next(self.batches)
            return {"Y": x, "BATCH_ID": np.full((x.shape[0], 1), batch, dtype=np.int64)}
        raise ValueError(f"unknown op {self.op}")
