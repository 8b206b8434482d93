"""An iterative sequence (request rescheduling, not decoupled): a request runs STEPS times, the
model releasing it with RESCHEDULE (None in its place) until the last, which answers
ITERATIONS (runs seen), MAX_BATCH (most requests in one execute call across its runs: new and
rescheduled requests share batches), CORRID (the correlation ID the batcher gave it) and STARTS
(runs whose START control input and START flag were both set: only the first)."""

import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.progress = {}  # correlation ID -> [runs, most requests in one call, starts]
        self.pause = threading.Event()  # never set: paces the iterations

    def execute(self, requests):
        self.pause.wait(0.02)
        responses = []
        for request in requests:
            steps = int(pb_utils.get_input_tensor_by_name(request, "STEPS").as_numpy()[0, 0])
            start_input = int(pb_utils.get_input_tensor_by_name(request, "START").as_numpy()[0, 0])
            start_flag = bool(request.flags() & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START)
            key = request.correlation_id()
            seen = self.progress.setdefault(key, [0, 0, 0])
            seen[0] += 1
            seen[1] = max(seen[1], len(requests))
            seen[2] += int(start_flag and start_input == 1)
            if seen[0] < steps:
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                responses.append(None)
                continue
            del self.progress[key]
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("ITERATIONS", np.array([[seen[0]]], dtype=np.int32)),
                        pb_utils.Tensor("MAX_BATCH", np.array([[seen[1]]], dtype=np.int32)),
                        pb_utils.Tensor("CORRID", np.array([[key]], dtype=np.uint64)),
                        pb_utils.Tensor("STARTS", np.array([[seen[2]]], dtype=np.int32)),
                    ]
                )
            )
        return responses
