"""add_sub: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, on whole batches."""

import numpy as np


class Model:
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a = inputs["INPUT0"]
        b = inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
