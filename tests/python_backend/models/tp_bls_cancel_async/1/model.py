"""tp_bls_cancel with `await async_exec(decoupled=True)` from an `async def execute`."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        request = requests[0]
        most = int(pb_utils.get_input_tensor_by_name(request, "MAX_SUM").as_numpy()[0])
        ignore = pb_utils.get_input_tensor_by_name(request, "IGNORE_CANCEL")
        stream = await pb_utils.InferenceRequest(
            model_name="tp_until_cancelled",
            inputs=[
                pb_utils.Tensor("INPUT", np.array([1], dtype=np.int32)),
                pb_utils.Tensor("MAX_RESPONSE_COUNT", np.array([50], dtype=np.int32)),
                ignore,
            ],
            requested_output_names=["OUTPUT"],
        ).async_exec(decoupled=True)
        total = count = 0
        cancelled = False
        for response in stream:
            if response.has_error():
                if response.error().code() != pb_utils.TritonError.CANCELLED:
                    raise pb_utils.TritonModelException(response.error().message())
                cancelled = True
                break
            out = pb_utils.get_output_tensor_by_name(response, "OUTPUT")
            if out is None:
                continue
            total += int(out.as_numpy()[0])
            count += 1
            if total >= most:
                stream.cancel()
        return [
            pb_utils.InferenceResponse(
                [
                    pb_utils.Tensor("SUM", np.array([total], dtype=np.int32)),
                    pb_utils.Tensor("COUNT", np.array([count], dtype=np.int32)),
                    pb_utils.Tensor("IS_CANCELLED", np.array([cancelled], dtype=np.bool_)),
                ]
            )
        ]
