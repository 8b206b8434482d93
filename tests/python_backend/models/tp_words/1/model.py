"""Decoupled, in execute's own thread: one response per word of text_input (upper-cased), the
last one sent with the final flag; an empty text fails the request with an error response."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()[0].decode()
            words = text.split()
            if not words:
                error = pb_utils.TritonError("text_input is empty", pb_utils.TritonError.INVALID_ARG)
                sender.send(
                    pb_utils.InferenceResponse(error=error),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
                continue
            for index, word in enumerate(words):
                out = pb_utils.Tensor("text_output", np.array([word.upper().encode()], dtype=np.object_))
                last = index == len(words) - 1
                flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0
                sender.send(pb_utils.InferenceResponse([out], parameters={"index": index}), flags=flags)
        return None
