"""Y = X for each request (its own rows), N = how many requests shared the execute call; each
call takes 50 ms, so concurrent requests queue up and share the next one."""

import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(0.05)
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            n = np.full((x.shape[0], 1), len(requests), dtype=np.int32)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("Y", x), pb_utils.Tensor("N", n)])
            )
        return responses
