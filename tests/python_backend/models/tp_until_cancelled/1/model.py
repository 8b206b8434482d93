"""Decoupled: OUTPUT = INPUT, again and again (10 ms apart), until the request is cancelled
(then a CANCELLED error as the final response, unless IGNORE_CANCEL) or MAX_RESPONSE_COUNT
responses were sent (the last with the final flag)."""

import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        request = requests[0]
        value = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()[0]
        most = int(pb_utils.get_input_tensor_by_name(request, "MAX_RESPONSE_COUNT").as_numpy()[0])
        ignore = bool(pb_utils.get_input_tensor_by_name(request, "IGNORE_CANCEL").as_numpy()[0])
        sender = request.get_response_sender()
        pause = threading.Event()  # never set: paces the responses
        sent = 0
        while True:
            if not ignore and request.is_cancelled():
                error = pb_utils.TritonError(
                    "request has been cancelled", pb_utils.TritonError.CANCELLED
                )
                sender.send(
                    pb_utils.InferenceResponse(error=error),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
                return None
            response = pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT", np.array([value], dtype=np.int32))]
            )
            sent += 1
            if sent == most:
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return None
            sender.send(response)
            pause.wait(0.01)
