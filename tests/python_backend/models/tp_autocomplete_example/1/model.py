"""Triton's auto_complete example shape (no config.pbtxt): reads as_dict()["input"] and
["output"] before adding what is missing; the top-level keys it saw are left in the config's
parameters (`seen_keys`) for the test to read back through the config API."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        config = auto_complete_model_config.as_dict()
        names = [item["name"] for item in config["input"]] + [o["name"] for o in config["output"]]
        fp32 = {"data_type": "TYPE_FP32", "dims": [4]}
        if "INPUT0" not in names:
            auto_complete_model_config.add_input({"name": "INPUT0", **fp32})
        if "OUTPUT0" not in names:
            auto_complete_model_config.add_output({"name": "OUTPUT0", **fp32})
        auto_complete_model_config.set_max_batch_size(4)
        auto_complete_model_config.set_dynamic_batching()
        config["parameters"]["seen_keys"] = {"string_value": ",".join(sorted(config))}
        return auto_complete_model_config

    def initialize(self, args):
        import json

        self.model_config = json.loads(args["model_config"])

    def execute(self, requests):
        keys = ",".join(sorted(self.model_config)).encode()
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            assert self.model_config["parameters"]["seen_keys"]["string_value"]
            responses.append(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))],
                    parameters={"initialize_keys": keys.decode()},
                )
            )
        return responses
