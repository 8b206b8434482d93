"""Decoupled `async def execute` on one instance. ROLE "wait": await the release of KEY (at most
30 s), then answer "released" (or "never released"); ROLE "release": release KEY and answer
"done"; ROLE "raise": raise ValueError. A wait can only end if the release runs while it awaits,
i.e. if execute() coroutines overlap on the instance."""

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.events = {}

    def event(self, key):
        return self.events.setdefault(key, asyncio.Event())

    async def execute(self, requests):
        for request in requests:
            role = pb_utils.get_input_tensor_by_name(request, "ROLE").as_numpy()[0].decode()
            key = pb_utils.get_input_tensor_by_name(request, "KEY").as_numpy()[0].decode()
            if role == "raise":
                raise ValueError(f"asked to raise for {key}")
            if role == "release":
                self.event(key).set()
                answer = "done"
            else:
                try:
                    await asyncio.wait_for(self.event(key).wait(), 30)
                    answer = "released"
                except TimeoutError:
                    answer = "never released"
            request.get_response_sender().send(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor("OUT", np.array([answer.encode()], dtype=np.object_))]
                ),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        return None
