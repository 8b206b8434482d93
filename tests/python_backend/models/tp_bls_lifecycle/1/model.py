"""BLS outside execute is refused as on Triton: initialize() tries a call and keeps the error
(MSG), finalize() tries one and logs the error. execute() calls the model NAMEd by its BYTES
input (InferenceRequest(model_name=<bytes>), as Triton's bls_sync example does): Y =
tp_add_sub(X, X).OUTPUT0 for X = [1, 2, 3, 4]."""

import numpy as np
import triton_python_backend_utils as pb_utils


def attempt():
    x = pb_utils.Tensor("INPUT0", np.ones((1, 4), dtype=np.float32))
    try:
        pb_utils.InferenceRequest(
            model_name="tp_add_sub",
            inputs=[x, pb_utils.Tensor("INPUT1", x.as_numpy())],
            requested_output_names=["OUTPUT0"],
        ).exec()
    except pb_utils.TritonModelException as exc:
        return str(exc)
    return "no error"


class TritonPythonModel:
    def initialize(self, args):
        self.refused = attempt()

    def execute(self, requests):
        responses = []
        for request in requests:
            name = pb_utils.get_input_tensor_by_name(request, "NAME").as_numpy()[0]
            assert isinstance(name, bytes)
            x = np.arange(1, 5, dtype=np.float32).reshape(1, 4)
            answer = pb_utils.InferenceRequest(
                model_name=name,
                inputs=[pb_utils.Tensor("INPUT0", x), pb_utils.Tensor("INPUT1", x)],
                requested_output_names=[b"OUTPUT0"],
            ).exec()
            if answer.has_error():
                raise pb_utils.TritonModelException(answer.error().message())
            y = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0").as_numpy()[0]
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("Y", y),
                        pb_utils.Tensor("MSG", np.array([self.refused.encode()], dtype=np.object_)),
                    ]
                )
            )
        return responses

    def finalize(self):
        pb_utils.Logger.log_info(f"tp_bls_lifecycle finalize BLS: {attempt()}")
