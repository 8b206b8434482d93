"""Sum and difference of two FP32 vectors, written against Triton's python backend API."""

import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = dict(args)
        self.model_config = json.loads(args["model_config"])
        self.out0_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(self.model_config, "OUTPUT0")["data_type"]
        )
        self.out1_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(self.model_config, "OUTPUT1")["data_type"]
        )
        self.requests_seen = pb_utils.MetricFamily(
            name="tp_add_sub_requests",
            description="Requests tp_add_sub has executed",
            kind=pb_utils.MetricFamily.COUNTER,
        ).Metric(labels={"instance": args["model_instance_name"]})
        pb_utils.Logger.log_info(f"tp_add_sub initialized as {args['model_instance_name']}")

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            out0 = pb_utils.Tensor("OUTPUT0", (a + b).astype(self.out0_dtype))
            out1 = pb_utils.Tensor("OUTPUT1", (a - b).astype(self.out1_dtype))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out0, out1]))
            self.requests_seen.increment(1)
        return responses

    def finalize(self):
        pb_utils.Logger.log_info("tp_add_sub finalized")
