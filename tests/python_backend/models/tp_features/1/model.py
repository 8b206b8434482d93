"""One model per pb_utils detail, chosen by the request's `mode` parameter (Y = X unless said):
- unknown / already_exists: a response error with TritonError.UNKNOWN / ALREADY_EXISTS
- param_float / param_nested / param_null / param_ok: InferenceResponse(parameters=...) with
  such a value; MSG = the exception's message (or "ok" and the parameters sent along)
- dlpack: Y = 2X computed in torch over the input's DLPack capsule (to_dlpack) and back
  (from_dlpack), and again through the __dlpack__ protocol (torch.from_dlpack(tensor))
- reschedule: set_release_flags(RESCHEDULE) on a model without iterative_sequence; MSG = the error
- log: one line per Logger level, through log() and the log_* helpers (text names the call)
Every request counts in a counter, sets a gauge and observes a histogram (custom metrics)."""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.requests = pb_utils.MetricFamily(
            "tp_features_requests", "Requests tp_features executed", pb_utils.MetricFamily.COUNTER
        ).Metric(labels={"model": "tp_features"})
        self.last_rows = pb_utils.MetricFamily(
            "tp_features_last_rows", "Rows of the last request", pb_utils.MetricFamily.GAUGE
        ).Metric(labels={"model": "tp_features"})
        self.rows = pb_utils.MetricFamily(
            "tp_features_rows", "Rows per request", pb_utils.MetricFamily.HISTOGRAM
        ).Metric(labels={"model": "tp_features"}, buckets=[1, 2, 4])

    def execute(self, requests):
        return [self.one(request) for request in requests]

    def one(self, request):
        x = pb_utils.get_input_tensor_by_name(request, "X")
        rows = x.as_numpy().shape[0]
        self.requests.increment(1)
        self.last_rows.set(rows)
        self.rows.observe(rows)
        mode = json.loads(request.parameters()).get("mode", "")
        y = x.as_numpy()
        message = ""
        parameters = None
        if mode in ("unknown", "already_exists"):
            error = pb_utils.TritonError
            code = error.UNKNOWN if mode == "unknown" else error.ALREADY_EXISTS
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{mode} happened", code))
        if mode.startswith("param_"):
            value = {
                "param_float": 0.5,
                "param_nested": {"a": 1},
                "param_null": None,
                "param_ok": "fine",
            }[mode]
            try:
                pb_utils.InferenceResponse([], parameters={"flag": True, "score": value})
                message = "ok"
                parameters = {"flag": True, "count": 3, "score": value}
            except pb_utils.TritonModelException as exc:
                message = str(exc)
        elif mode == "dlpack":
            doubled = torch.utils.dlpack.from_dlpack(x.to_dlpack()) * 2
            again = torch.from_dlpack(x) * 1  # the __dlpack__ protocol, same memory
            assert torch.equal(again * 2, doubled)
            y = pb_utils.Tensor.from_dlpack("Y", torch.utils.dlpack.to_dlpack(doubled)).as_numpy()
        elif mode == "reschedule":
            try:
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                message = "no error"
            except pb_utils.TritonModelException as exc:
                message = str(exc)
        elif mode == "log":
            logger = pb_utils.Logger
            logger.log("tp_features log() INFO line", logger.INFO)
            logger.log("tp_features log() WARNING line", logger.WARNING)
            logger.log("tp_features log() ERROR line", logger.ERROR)
            logger.log("tp_features log() VERBOSE line", logger.VERBOSE)
            logger.log_info("tp_features log_info line")
            logger.log_warn("tp_features log_warn line")
            logger.log_error("tp_features log_error line")
            logger.log_verbose("tp_features log_verbose line")
        msg = np.array([[message.encode()]] * rows, dtype=np.object_)
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor("Y", y), pb_utils.Tensor("MSG", msg)], parameters=parameters
        )
