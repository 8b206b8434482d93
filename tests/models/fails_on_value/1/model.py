"""Identity that raises ValueError when the input holds the value 13."""

import numpy as np

FAILING_VALUE = 13


class Model:
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = inputs["INPUT0"]
        if (values == FAILING_VALUE).any():
            raise ValueError(f"refusing the value {FAILING_VALUE}")
        return {"OUTPUT0": values}
