"""No inputs or outputs in config.pbtxt: auto_complete_config declares them; also echoes the
request's metadata (id, parameters, requested outputs, initialize args) back as BYTES."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        auto_complete_model_config.set_max_batch_size(8)
        auto_complete_model_config.add_input({"name": "TEXT", "data_type": "TYPE_STRING", "dims": [1]})
        auto_complete_model_config.add_output({"name": "UPPER", "data_type": "TYPE_STRING", "dims": [1]})
        auto_complete_model_config.add_output({"name": "INFO", "data_type": "TYPE_STRING", "dims": [1]})
        auto_complete_model_config.set_dynamic_batching()
        return auto_complete_model_config

    def initialize(self, args):
        self.args = args
        self.config = json.loads(args["model_config"])

    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT")
            values = text.as_numpy()
            upper = np.array([[v[0].upper()] for v in values], dtype=np.object_)
            info = {
                "request_id": request.request_id(),
                "parameters": json.loads(request.parameters()),
                "requested": request.requested_output_names(),
                "args": {k: v for k, v in self.args.items() if k != "model_config"},
                "max_batch_size": self.config["max_batch_size"],
                "dims": pb_utils.get_input_config_by_name(self.config, "TEXT")["dims"],
                "triton_dtype": text.triton_dtype(),
                "shape": text.shape(),
                "is_cpu": text.is_cpu(),
                "decoupled": pb_utils.using_decoupled_model_transaction_policy(self.config),
                "model_dir_ok": pb_utils.get_model_dir().endswith("1"),
                "roundtrip": [
                    x.decode()
                    for x in pb_utils.deserialize_bytes_tensor(pb_utils.serialize_byte_tensor(values))
                ],
                "np_to_triton": pb_utils.numpy_to_triton_type(np.float32),
                "triton_to_np": str(
                    np.dtype(pb_utils.triton_to_numpy_type(pb_utils.TRITONSERVER_TYPE_INT64))
                ),
            }
            blob = json.dumps(info).encode()
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("UPPER", upper),
                        pb_utils.Tensor("INFO", np.array([[blob]] * len(values), dtype=np.object_)),
                    ]
                )
            )
        return responses
