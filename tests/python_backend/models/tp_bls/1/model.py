"""BLS with the synchronous API, chosen by the request's `mode` parameter:
- add (default): Y = tp_add_sub(X, X).OUTPUT0, i.e. 2X
- stream: Y[0] = sum of tp_repeat's responses for IN = X as ints (exec(decoupled=True)),
  MSG = the number of responses and whether the last was empty
- self: call tp_bls itself (refused: cycle); MSG = the error
- missing: call a model that does not exist; MSG = the error
- pingpong: call tp_pong, which calls tp_bls back (refused: cycle); MSG = tp_pong's message
- timeout: call tp_slow (0.5 s) with a 50 ms timeout; MSG = the error"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [self.one(request) for request in requests]

    def one(self, request):
        x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
        mode = json.loads(request.parameters()).get("mode", "add")
        y = np.zeros_like(x)
        message = ""
        if mode == "add":
            inner = pb_utils.InferenceRequest(
                model_name="tp_add_sub",
                inputs=[pb_utils.Tensor("INPUT0", x), pb_utils.Tensor("INPUT1", x)],
                requested_output_names=["OUTPUT0"],
            )
            response = inner.exec()
            if response.has_error():
                raise pb_utils.TritonModelException(response.error().message())
            y = pb_utils.get_output_tensor_by_name(response, "OUTPUT0").as_numpy()
            message = ",".join(t.name() for t in response.output_tensors())
        elif mode == "stream":
            inner = pb_utils.InferenceRequest(
                model_name="tp_repeat",
                inputs=[pb_utils.Tensor("IN", x[0].astype(np.int32))],
                requested_output_names=["OUT", "IDX"],
            )
            total = 0
            count = 0
            last_empty = False
            for response in inner.exec(decoupled=True):
                if response.has_error():
                    raise pb_utils.TritonModelException(response.error().message())
                count += 1
                out = pb_utils.get_output_tensor_by_name(response, "OUT")
                last_empty = out is None
                if out is not None:
                    total += int(out.as_numpy()[0])
            y = np.zeros_like(x)
            y[:, 0] = total
            message = json.dumps({"responses": count, "last_empty": last_empty})
        elif mode == "timeout":
            inner = pb_utils.InferenceRequest(
                model_name="tp_slow",
                inputs=[pb_utils.Tensor("X", x)],
                requested_output_names=["Y"],
                timeout=50_000,
            )
            response = inner.exec()
            message = response.error().message() if response.has_error() else "no error"
        elif mode == "pingpong":
            inner = pb_utils.InferenceRequest(
                model_name="tp_pong", inputs=[pb_utils.Tensor("X", x)], requested_output_names=["MSG"]
            )
            response = inner.exec()
            if response.has_error():
                raise pb_utils.TritonModelException(response.error().message())
            message = pb_utils.get_output_tensor_by_name(response, "MSG").as_numpy()[0, 0].decode()
        else:
            target = "tp_bls" if mode == "self" else "no_such_model"
            inner = pb_utils.InferenceRequest(
                model_name=target, inputs=[pb_utils.Tensor("X", x)], requested_output_names=["Y"]
            )
            response = inner.exec()
            message = response.error().message() if response.has_error() else "no error"
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("Y", y.astype(np.float32)),
                pb_utils.Tensor("MSG", np.array([[message.encode()]] * len(x), dtype=np.object_)),
            ]
        )
