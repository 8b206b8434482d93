"""Decoupled: one response per element of IN (OUT = element, IDX = position), sent from a
thread of its own after execute returned, then the final flag alone. An empty IN sends only the
final flag. Parameter `until_cancelled`: keep sending until the client cancels, count that in
the metric tp_repeat_cancelled, then send the final flag."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        assert pb_utils.using_decoupled_model_transaction_policy(config)
        self.cancelled = pb_utils.MetricFamily(
            "tp_repeat_cancelled", "Streams the client cancelled", pb_utils.MetricFamily.COUNTER
        ).Metric()
        self.threads = []

    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().copy()
            forever = json.loads(request.parameters()).get("until_cancelled", False)
            thread = threading.Thread(target=self.respond, args=(request, values, forever))
            thread.start()
            self.threads.append(thread)
        return None

    def respond(self, request, values, forever):
        sender = request.get_response_sender()
        if forever:
            deadline = time.monotonic() + 30
            index = 0
            while not sender.is_cancelled() and time.monotonic() < deadline:
                sender.send(self.response(index, index))
                index += 1
                time.sleep(0.01)
            if request.is_cancelled():
                self.cancelled.increment(1)
        else:
            for index, value in enumerate(values):
                sender.send(self.response(int(value), index))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def response(value, index):
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("OUT", np.array([value], dtype=np.int32)),
                pb_utils.Tensor("IDX", np.array([index], dtype=np.int32)),
            ]
        )

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=5)
