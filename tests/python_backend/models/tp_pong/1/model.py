"""Calls tp_bls back (tp_bls -> tp_pong -> tp_bls would be a cycle); MSG = what it got."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X")
            back = pb_utils.InferenceRequest(
                model_name="tp_bls", inputs=[x], requested_output_names=["Y"]
            ).exec()
            message = back.error().message() if back.has_error() else "no error"
            rows = x.as_numpy().shape[0]
            msg = np.array([[message.encode()]] * rows, dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("MSG", msg)]))
        return responses
