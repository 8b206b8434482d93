"""Calls itself through BLS DEPTH times (DEPTH - 1 each hop): REACHED = the hops that ran, MSG =
the error of the call that was refused, if one was. Parameter `timeout_us`: each call made at
DEPTH waits at most DEPTH x timeout_us (outer calls longer than inner ones); a call that can
time out is never refused."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            depth = int(pb_utils.get_input_tensor_by_name(request, "DEPTH").as_numpy()[0])
            timeout = int(json.loads(request.parameters()).get("timeout_us", 0))
            reached, message = 0, ""
            if depth > 0:
                inner = pb_utils.InferenceRequest(
                    model_name="tp_recurse",
                    inputs=[pb_utils.Tensor("DEPTH", np.array([depth - 1], dtype=np.int32))],
                    requested_output_names=["REACHED", "MSG"],
                    parameters={"timeout_us": timeout},
                    timeout=timeout * depth,
                )
                answer = inner.exec()
                if answer.has_error():
                    message = answer.error().message()
                else:
                    reached = 1 + int(
                        pb_utils.get_output_tensor_by_name(answer, "REACHED").as_numpy()[0]
                    )
                    message = pb_utils.get_output_tensor_by_name(answer, "MSG").as_numpy()[0].decode()
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("REACHED", np.array([reached], dtype=np.int32)),
                        pb_utils.Tensor("MSG", np.array([message.encode()], dtype=np.object_)),
                    ]
                )
            )
        return responses
