"""Triton's decoupled rescheduling example: IN responses in all, one per run, OUT = responses
still to come; every run but the last releases the request with RESCHEDULE before execute
returns, the last sends its response with the final flag."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.remaining = {}  # correlation ID -> responses still to send

    def execute(self, requests):
        for request in requests:
            key = request.correlation_id()
            if request.flags() & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START:
                self.remaining[key] = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            self.remaining[key] -= 1
            left = self.remaining[key]
            response = pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUT", np.array([left], dtype=np.int32))]
            )
            sender = request.get_response_sender()
            if left <= 0:
                del self.remaining[key]
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                sender.send(response)
        return None
