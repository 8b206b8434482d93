"""The Open Inference Protocol over gRPC, on grpcio's thread-pool server.

Measured on the 2-core development machine (DESIGN.md): grpcio's thread-pool server handing each
request to the asyncio scheduler served ~1.6x the requests/s of grpc.aio on the same loop, so
handlers run on gRPC's threads, decode and validate there, and only queueing happens on the loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
from google.protobuf import json_format

from convoy.datatypes import to_wire_bytes
from convoy.errors import ConvoyError, InvalidInput, Unsupported, status_of
from convoy.protos import grpc_service_pb2 as pb
from convoy.protos import grpc_service_pb2_grpc as pb_grpc
from convoy.types import Request

from . import tensors
from .repository import ModelVersion
from .service import InferenceService

log = logging.getLogger("convoy.grpc")

#: V2 datatype -> the InferTensorContents field that carries it (FP16/BF16 only travel raw).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _parameter(value: pb.InferParameter):
    which = value.WhichOneof("parameter_choice")
    return getattr(value, which) if which else None


def _int_parameter(parameters: dict, name: str) -> int:
    value = parameters.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"parameter '{name}': expected a non-negative integer, got {value!r}")
    return value


def decode_request(
    service: InferenceService, message: pb.ModelInferRequest, future, deadline: float | None
) -> tuple[ModelVersion, Request]:
    """Validate a ModelInferRequest against its model and build the scheduler's Request."""
    received = time.monotonic_ns()
    entry = service.repository.get(message.model_name, message.model_version)
    config = entry.config
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(
            f"raw_input_contents holds {len(raw)} tensors for {len(message.inputs)} inputs; "
            "expected one per input"
        )
    inputs = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        if name in inputs:
            raise InvalidInput(f"input '{name}' appears more than once")
        spec = tensors.input_spec(config, name)
        shape = list(tensor.shape)
        tensors.check_shape(config, spec, tensor.datatype, shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input '{name}': set either raw_input_contents or contents, not both"
                )
            array = tensors.from_raw(spec, tensor.datatype, shape, raw[index])
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise InvalidInput(
                    f"input '{name}': {tensor.datatype} data must be sent in raw_input_contents"
                )
            array = tensors.from_values(
                spec, tensor.datatype, shape, getattr(tensor.contents, field)
            )
        inputs[name] = tensors.apply_reshape(config, spec, array)
    rows = tensors.check_complete(config, inputs)
    parameters = {k: _parameter(v) for k, v in message.parameters.items()}
    requested = tensors.check_requested_outputs(config, [o.name for o in message.outputs])
    request = Request(
        id=message.id,
        inputs=inputs,
        requested_outputs=requested,
        rows=rows,
        future=future,
        priority=_int_parameter(parameters, "priority"),
        timeout_us=_int_parameter(parameters, "timeout"),
        deadline=deadline,
        parameters=parameters,
        received_ns=received,
    )
    return entry, request


def encode_response(entry: ModelVersion, request: Request, outputs) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=entry.config.name, model_version=str(entry.version), id=request.id
    )
    for name, datatype, array in tensors.select_outputs(
        entry.config, outputs, request.requested_outputs
    ):
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(to_wire_bytes(array, datatype))
    return response


class GrpcFrontend(pb_grpc.GRPCInferenceServiceServicer):
    """Servicer: every handler maps ConvoyError onto its status, anything else onto INTERNAL."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    # --- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: BaseException):
        code, _, message = status_of(exc)
        if not isinstance(exc, ConvoyError):
            log.exception("gRPC handler failed", exc_info=exc)
        context.abort(grpc.StatusCode[code], message)

    def _infer(self, message: pb.ModelInferRequest, deadline: float | None, context=None):
        """Decode, queue, wait; returns (entry, request, outputs). Runs on a gRPC thread."""
        future: Future = Future()
        entry, request = decode_request(self.service, message, future, deadline)
        self.service.submit_threadsafe(entry, request)
        if context is not None:
            context.add_callback(
                lambda: None if future.done() else self.service.cancel_threadsafe(entry, request)
            )
        result = future.result()
        return entry, request, result.outputs

    # --- health / metadata -------------------------------------------------------------------
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.service.live())

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready())

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))

    def ServerMetadata(self, request, context):
        return json_format.ParseDict(self.service.server_metadata(), pb.ServerMetadataResponse())

    def ModelMetadata(self, request, context):
        try:
            answer = self.service.model_metadata(request.name, request.version)
            return json_format.ParseDict(answer, pb.ModelMetadataResponse())
        except Exception as exc:
            self._abort(context, exc)

    def ModelConfig(self, request, context):
        try:
            return pb.ModelConfigResponse(
                config=self.service.model_config(request.name, request.version)
            )
        except Exception as exc:
            self._abort(context, exc)

    def ModelStatistics(self, request, context):
        try:
            answer = self.service.model_statistics(request.name, request.version)
            return json_format.ParseDict(answer, pb.ModelStatisticsResponse())
        except Exception as exc:
            self._abort(context, exc)

    # --- repository ----------------------------------------------------------------------------
    def RepositoryIndex(self, request, context):
        rows = self.service.repository_index(request.ready)
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows]
        )

    def RepositoryModelLoad(self, request, context):
        try:
            self.service.run_threadsafe(self.service.load_model(request.model_name)).result()
            return pb.RepositoryModelLoadResponse()
        except Exception as exc:
            self._abort(context, exc)

    def RepositoryModelUnload(self, request, context):
        try:
            self.service.run_threadsafe(self.service.unload_model(request.model_name)).result()
            return pb.RepositoryModelUnloadResponse()
        except Exception as exc:
            self._abort(context, exc)

    # --- inference -------------------------------------------------------------------------------
    def ModelInfer(self, request, context):
        try:
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            entry, decoded, outputs = self._infer(request, deadline, context)
            return encode_response(entry, decoded, outputs)
        except Exception as exc:
            self._abort(context, exc)

    def ModelStreamInfer(self, request_iterator, context):
        """Responses go out as each request completes; an error answers that request only."""
        answers: queue.SimpleQueue = queue.SimpleQueue()
        state = {"submitted": 0}
        finished = object()

        def answer(message):
            def on_done(future: Future) -> None:
                try:
                    entry, decoded = future.context
                    out = encode_response(entry, decoded, future.result().outputs)
                    answers.put(pb.ModelStreamInferResponse(infer_response=out))
                except BaseException as exc:  # delivered to the client as the stream's error
                    answers.put(self._stream_error(message, exc))

            return on_done

        def read() -> None:
            try:
                for message in request_iterator:
                    state["submitted"] += 1
                    future: Future = Future()
                    try:
                        remaining = context.time_remaining()
                        deadline = None if remaining is None else time.monotonic() + remaining
                        entry, decoded = decode_request(self.service, message, future, deadline)
                    except Exception as exc:
                        answers.put(self._stream_error(message, exc))
                        continue
                    future.context = (entry, decoded)
                    future.add_done_callback(answer(message))
                    self.service.submit_threadsafe(entry, decoded)
            except Exception:
                log.debug("stream reader ended", exc_info=True)
            finally:
                answers.put(finished)

        reader = threading.Thread(target=read, name="grpc-stream-reader", daemon=True)
        reader.start()
        delivered = 0
        reader_done = False
        while not reader_done or delivered < state["submitted"]:
            item = answers.get()
            if item is finished:
                reader_done = True
                continue
            delivered += 1
            yield item

    @staticmethod
    def _stream_error(message, exc: BaseException) -> pb.ModelStreamInferResponse:
        _, _, text = status_of(exc)
        if not isinstance(exc, ConvoyError):
            log.error("stream request failed", exc_info=exc)
        return pb.ModelStreamInferResponse(
            error_message=text,
            infer_response=pb.ModelInferResponse(
                model_name=message.model_name, model_version=message.model_version, id=message.id
            ),
        )

    # --- not implemented: shared memory, tracing, logging -------------------------------------------
    def _unsupported(self, context, what: str):
        self._abort(context, Unsupported(f"{what} is not supported by Convoy"))

    def SystemSharedMemoryStatus(self, request, context):
        return pb.SystemSharedMemoryStatusResponse()

    def CudaSharedMemoryStatus(self, request, context):
        return pb.CudaSharedMemoryStatusResponse()

    def SystemSharedMemoryRegister(self, request, context):
        self._unsupported(context, "system shared memory")

    def SystemSharedMemoryUnregister(self, request, context):
        self._unsupported(context, "system shared memory")

    def CudaSharedMemoryRegister(self, request, context):
        self._unsupported(context, "CUDA shared memory")

    def CudaSharedMemoryUnregister(self, request, context):
        self._unsupported(context, "CUDA shared memory")

    def TraceSetting(self, request, context):
        self._unsupported(context, "trace settings")

    def LogSettings(self, request, context):
        self._unsupported(context, "log settings")


def start_grpc_server(
    service: InferenceService, host: str, port: int, workers: int, max_message_bytes: int
) -> tuple[grpc.Server, int]:
    """Start the server; returns it and the port it bound (port 0 picks a free one)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(GrpcFrontend(service), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"gRPC could not bind {host}:{port}")
    server.start()
    return server, bound
