"""Misbehaves on request: X < 0 -> that request's response carries a TritonError; X == 100 ->
execute raises; X == 200 -> returns one response too few; X == 300 -> returns None."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        values = [int(pb_utils.get_input_tensor_by_name(r, "X").as_numpy()[0, 0]) for r in requests]
        if 100 in values:
            raise pb_utils.TritonModelException("the model refuses the value 100")
        if 300 in values:
            return None
        responses = []
        for value in values:
            if value < 0:
                error = pb_utils.TritonError(f"negative value {value}", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                y = np.array([[value + 1]], dtype=np.int32)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", y)]))
        if 200 in values:
            responses.pop()
        return responses
