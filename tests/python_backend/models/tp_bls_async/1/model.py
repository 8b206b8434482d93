"""BLS with async_exec: two calls to tp_add_sub in flight at once; Y = (X + X) + (X - X) = 2X,
plus the number of responses tp_repeat streams for [1, 2, 3] (async_exec(decoupled=True))."""

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        return [await self.one(request) for request in requests]

    async def one(self, request):
        x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
        first = pb_utils.InferenceRequest(
            model_name="tp_add_sub",
            inputs=[pb_utils.Tensor("INPUT0", x), pb_utils.Tensor("INPUT1", x)],
            requested_output_names=["OUTPUT0"],
        )
        second = pb_utils.InferenceRequest(
            model_name="tp_add_sub",
            inputs=[pb_utils.Tensor("INPUT0", x), pb_utils.Tensor("INPUT1", x)],
            requested_output_names=["OUTPUT1"],
        )
        a, b = await asyncio.gather(first.async_exec(), second.async_exec())
        for response in (a, b):
            if response.has_error():
                raise pb_utils.TritonModelException(response.error().message())
        streamed = 0
        stream = pb_utils.InferenceRequest(
            model_name="tp_repeat",
            inputs=[pb_utils.Tensor("IN", np.array([1, 2, 3], dtype=np.int32))],
            requested_output_names=["OUT"],
        )
        for response in await stream.async_exec(decoupled=True):
            if pb_utils.get_output_tensor_by_name(response, "OUT") is not None:
                streamed += 1
        y = (
            pb_utils.get_output_tensor_by_name(a, "OUTPUT0").as_numpy()
            + pb_utils.get_output_tensor_by_name(b, "OUTPUT1").as_numpy()
        )
        y = y.copy()
        y[:, -1] = streamed
        return pb_utils.InferenceResponse([pb_utils.Tensor("Y", y)])
