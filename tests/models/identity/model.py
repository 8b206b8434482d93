"""Identity: OUTPUT0 is INPUT0, whatever the datatype (the config names it)."""

import numpy as np


class Model:
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": inputs["INPUT0"]}
