"""A minimal Open Inference Protocol gRPC client for the load generator: unary and streamed
ModelInfer, model metadata and config, one channel closed exactly once.

tritonclient.grpc's client closes its channel again from `__del__`; under gevent every close
decrements grpc's channel count, and a close run by the garbage collector can block forever
at interpreter exit. So the users speak the protocol through tritonclient's generated stubs
(not convoy.protos: the load generator needs nothing from the server it measures).
"""

from __future__ import annotations

import queue

import gevent
import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from .checks import InferResponse
from .errors import RequestFailed, from_client_error
from .payloads import ModelSpec

#: Room for large tensors; the server enforces its own limit.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def encode_request(
    model: ModelSpec, request_id: str, inputs: dict[str, np.ndarray]
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model.name, model_version=model.version, id=request_id)
    for spec in model.inputs:
        array = inputs[spec.name]
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if spec.datatype == "BYTES":
            serialized = serialize_byte_tensor(array)
            request.raw_input_contents.append(serialized.item() if serialized.size else b"")
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for spec in model.outputs:
        request.outputs.add(name=spec.name)
    return request


def decode_response(response: pb.ModelInferResponse) -> InferResponse:
    outputs = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=False):
        shape = tuple(tensor.shape)
        if tensor.datatype == "BYTES":
            array = deserialize_bytes_tensor(raw)
        elif tensor.datatype == "BF16":
            import ml_dtypes

            array = np.frombuffer(raw, dtype=ml_dtypes.bfloat16)
        else:
            array = np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype))
        outputs[tensor.name] = (tensor.datatype, array.reshape(shape))
    if len(outputs) != len(response.outputs):
        raise RequestFailed(
            f"response has {len(response.outputs)} outputs but {len(response.raw_output_contents)} "
            "raw contents (typed contents are not read by the load generator)"
        )
    return InferResponse(response.id, response.model_name, outputs)


def _failure(error: grpc.RpcError):
    return from_client_error(str(error.code()), error.details() or "")


class GrpcInferClient:
    """One channel to one server; `close()` is the only thing that closes it."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            url,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._requests: queue.Queue | None = None
        self._responses = None

    def close(self) -> None:
        self.close_stream()
        self._channel.close()

    # --- unary ------------------------------------------------------------------------------------
    def infer(self, model: ModelSpec, request_id: str, inputs: dict[str, np.ndarray]) -> InferResponse:
        try:
            response = self._stub.ModelInfer(
                encode_request(model, request_id, inputs), timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise _failure(exc) from None
        return decode_response(response)

    def model_metadata(self, model: str, version: str) -> dict:
        answer = self._stub.ModelMetadata(
            pb.ModelMetadataRequest(name=model, version=version), timeout=self.timeout_s
        )
        return MessageToDict(answer, preserving_proto_field_name=True)

    def model_config(self, model: str, version: str) -> dict | None:
        """The config (Triton extension), or None where the server does not have it."""
        try:
            answer = self._stub.ModelConfig(
                pb.ModelConfigRequest(name=model, version=version), timeout=self.timeout_s
            )
        except grpc.RpcError:
            return None
        return MessageToDict(answer.config, preserving_proto_field_name=True)

    # --- streaming --------------------------------------------------------------------------------
    def open_stream(self) -> None:
        self._requests = queue.Queue()
        self._responses = self._stub.ModelStreamInfer(iter(self._requests.get, None))

    def close_stream(self) -> None:
        if self._requests is not None:
            self._requests.put(None)  # ends the request iterator: the stream half-closes
            self._responses.cancel()
        self._requests = self._responses = None

    def stream_infer(
        self, model: ModelSpec, request_id: str, inputs: dict[str, np.ndarray]
    ) -> InferResponse:
        """Send on the stream and read its next response: one request in flight per stream."""
        if self._requests is None:
            self.open_stream()
        self._requests.put(encode_request(model, request_id, inputs))
        try:
            with gevent.Timeout(self.timeout_s):
                message = next(self._responses)
        except gevent.Timeout:
            # A late answer would be read as the next request's: start a new stream.
            self.close_stream()
            raise RequestFailed(f"no streamed response within {self.timeout_s:g} s") from None
        except grpc.RpcError as exc:
            self.close_stream()  # a gRPC status ends the whole stream
            raise _failure(exc) from None
        except StopIteration:
            self.close_stream()
            raise RequestFailed("the server ended the stream") from None
        if message.error_message:
            # Per-request errors carry no status code, only the message.
            raise from_client_error(None, message.error_message)
        return decode_response(message.infer_response)
