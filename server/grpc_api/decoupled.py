"""Decoupled models over gRPC ModelStreamInfer: each response the model sends becomes one
ModelStreamInferResponse on the stream, as it is produced.

As Triton does: every response carries the parameter `triton_final_response` (true on the
request's last), beside the model's own response parameters; a request with parameter
`triton_enable_empty_final_response: true` also gets an empty response marking the end when the
model's final flag came without one; without it, a bare final flag sends nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

from convoy.errors import ConvoyError, status_of
from convoy.outputs import select_outputs
from convoy.protos import grpc_service_pb2 as pb
from convoy.types import Request, Response, StreamedResponse

log = logging.getLogger("convoy.grpc")

#: Triton's answer to a unary ModelInfer on a decoupled model.
DECOUPLED_UNARY = "ModelInfer RPC doesn't support models with decoupled transaction policy"

EMPTY_FINAL = "triton_enable_empty_final_response"
FINAL_FLAG = "triton_final_response"


class StreamFailure(NamedTuple):
    """A stream's error answer and its status (the status ends the stream when the client
    asked with Triton's triton_grpc_error header)."""

    code: str
    response: pb.ModelStreamInferResponse


def set_parameter(target, key: str, value) -> None:
    """One InferParameter in a protobuf parameters map, by the value's type."""
    parameter = target[key]
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)


def stream_sink(
    entry, request: Request, message: pb.ModelInferRequest, put: Callable, encode: Callable
) -> Callable[[StreamedResponse], None]:
    """The request's `stream`: encodes each response and hands it to `put` (on the loop)."""
    empty_final = bool(request.parameters.get(EMPTY_FINAL, False))

    def bare() -> pb.ModelInferResponse:
        return pb.ModelInferResponse(
            model_name=entry.config.name, model_version=str(entry.version), id=request.id
        )

    def sink(item: StreamedResponse) -> None:
        if item.error:  # one response, which says whether it was the last (as Triton's)
            failed = bare()
            failed.parameters[FINAL_FLAG].bool_param = item.final
            response = pb.ModelStreamInferResponse(error_message=item.error, infer_response=failed)
            put(StreamFailure(item.error_status or "INTERNAL", response))
            return
        if not item.outputs and not item.parameters and not (item.final and empty_final):
            return  # a bare final flag: nothing to send unless the client asked for it
        try:
            if item.outputs:
                requested = tuple(n for n in request.requested_outputs if n in item.outputs)
                outputs = select_outputs(item.outputs, requested, entry.config)
                if isinstance(outputs, ConvoyError):
                    raise outputs
                result = Response(outputs, entry.config.name, str(entry.version))
                response = encode(entry, _Requested(request, requested), result)
            else:
                response = bare()
        except Exception as exc:
            code, _, text = status_of(exc)
            if not isinstance(exc, ConvoyError):
                log.error("encoding a streamed response failed", exc_info=exc)
            put(
                StreamFailure(
                    code, pb.ModelStreamInferResponse(error_message=text, infer_response=bare())
                )
            )
            return
        for key, value in item.parameters.items():
            set_parameter(response.parameters, key, value)
        response.parameters[FINAL_FLAG].bool_param = item.final
        put(pb.ModelStreamInferResponse(infer_response=response))

    return sink


class _Requested:
    """The request as `encode` reads it, asking for only the outputs this response carries."""

    __slots__ = ("id", "requested_outputs")

    def __init__(self, request: Request, requested: tuple[str, ...]) -> None:
        self.id = request.id
        self.requested_outputs = requested
