"""Version 1: OUTPUT0 = INPUT0 + 1, so an answer tells which version computed it."""

import numpy as np


class Model:
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": inputs["INPUT0"] + 1}
