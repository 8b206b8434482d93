"""`async def execute`: doubles X after awaiting (and, with parameter bls=true, asks tp_add_sub)."""

import asyncio

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            await asyncio.sleep(0)
            responses.append(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor("Y", x * 2)], parameters={"doubled": True, "rows": len(x)}
                )
            )
        return responses
