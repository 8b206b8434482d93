"""The Open Inference Protocol over gRPC, on grpc.aio sharing the schedulers' event loop.

Measured on the 2-core development machine with perf_analyzer (1-row add_sub requests,
concurrency 32): grpcio's thread-pool server handing requests to the loop served 1.5-1.9k
requests/s, its 64 handler threads spending the core on GIL hand-offs (~20 futex calls per
request); grpc.aio on the loop served 3.4k with no thread hop at all. So handlers are coroutines
that decode, queue and await on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf import json_format

from convoy.auth import Keyring
from convoy.datatypes import to_wire_bytes
from convoy.engine.client import EngineClient, ModelView
from convoy.engine.shared_memory import SharedMemoryLease, SharedMemoryRef
from convoy.errors import (
    ConvoyError,
    InvalidInput,
    Overloaded,
    Unavailable,
    status_of,
)
from convoy.protos import grpc_service_pb2 as pb
from convoy.protos import grpc_service_pb2_grpc as pb_grpc
from convoy.server import codec as tensors
from convoy.server.grpc_api.decoding import DecodeErrorInterceptor
from convoy.server.grpc_api.decoupled import (
    DECOUPLED_UNARY,
    FINAL_FLAG,
    StreamFailure,
    set_parameter,
    stream_sink,
)
from convoy.server.grpc_api.interceptors import ApiKeyInterceptor, current_key
from convoy.server.memory import MemoryTrim
from convoy.server.observability.tracing import TRACEPARENT, Tracer
from convoy.types import Request, Response

log = logging.getLogger("convoy.grpc")

#: Requests a ModelStreamInfer call may have read but not yet answered on the wire.
STREAM_BACKLOG = 256

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


def decode_request(
    engine: EngineClient,
    message: pb.ModelInferRequest,
    future,
    deadline: float | None,
    principal: str | None = None,
    leases: list | None = None,
) -> tuple[ModelView, Request]:
    """Validate a ModelInferRequest against its model and build the scheduler's Request. The
    shared-memory regions inputs name are leased into `leases` (released once answered)."""
    received = time.monotonic_ns()
    entry = engine.resolve(message.model_name, message.model_version)
    config = entry.config
    raw = message.raw_input_contents
    inputs = {}
    raw_index = 0
    for tensor in message.inputs:
        name = tensor.name
        tensors.check_new_input(name, inputs)
        shape = list(tensor.shape)
        tensors.check_wire_shape(name, shape)
        ref = _shared_memory_ref(tensor, "input")
        has_contents = tensor.HasField("contents")
        # Typed contents conflict with any raw_input_contents in the request (Triton's rule);
        # an input without them takes the next raw entry, which must be there.
        if ref is not None:
            has_raw = False
        elif has_contents:
            has_raw = bool(raw)
        else:
            has_raw = raw_index < len(raw)
        tensors.check_data_source(
            name,
            config.name,
            shared_memory=ref is not None,
            inline=has_contents,
            binary=has_raw,
            inline_field="contents field",
            binary_field="raw_input_contents",
        )
        spec = tensors.input_spec(config, name)
        tensors.check_shape(config, spec, tensor.datatype, shape)
        if ref is not None:
            what = f"input '{name}'"
            lease = engine.lease_shared_memory(ref, what)
            leases.append(lease)
            array = tensors.from_raw(spec, tensor.datatype, shape, lease.read(what))
        elif has_raw:
            array = tensors.from_raw(spec, tensor.datatype, shape, raw[raw_index])
            raw_index += 1
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise InvalidInput(
                    f"input '{name}': {tensor.datatype} data must be sent in raw_input_contents"
                )
            contents = getattr(tensor.contents, field)
            tensors.check_value_count(spec, shape, contents)  # before any conversion
            array = tensors.from_values(spec, tensor.datatype, shape, contents)
        inputs[name] = tensors.apply_reshape(config, spec, array)
    if raw_index != len(raw):
        raise InvalidInput(
            f"raw_input_contents holds {len(raw)} tensors for {raw_index} inputs sent raw; "
            "expected one per input not in shared memory"
        )
    rows = tensors.check_complete(config, inputs)
    parameters = {k: _parameter(v) for k, v in message.parameters.items()}
    requested = tensors.check_requested_outputs(config, [o.name for o in message.outputs])
    request = tensors.build_request(
        message.id, inputs, requested, rows, parameters, future, received, principal, deadline
    )
    return entry, request


def _shared_memory_ref(tensor, kind: str) -> SharedMemoryRef | None:
    """The region an input or requested output names in its parameters, or None."""
    if not tensor.parameters:
        return None
    parameters = {k: _parameter(v) for k, v in tensor.parameters.items()}
    return tensors.shared_memory_ref(parameters, f"{kind} '{tensor.name}'")


def output_leases(engine: EngineClient, message, leases: list) -> dict[str, SharedMemoryLease]:
    """Requested outputs to be written into shared memory: their regions, checked and leased
    (each lease is also added to `leases`, released once the request is answered)."""
    out = {}
    for output in message.outputs:
        ref = _shared_memory_ref(output, "output")
        if ref is not None:
            out[output.name] = lease = engine.lease_shared_memory(ref, f"output '{output.name}'")
            leases.append(lease)
    return out


#: Triton's request header that makes a ModelStreamInfer error end the stream with its status.
GRPC_ERROR_HEADER = "triton_grpc_error"


def _wants_grpc_errors(context) -> bool:
    for key, value in context.invocation_metadata() or ():
        if key == GRPC_ERROR_HEADER:
            return value == "true"
    return False


def _metadata_value(context, name: str) -> str | None:
    """The call's metadata entry `name` (lower case), or None."""
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else None
    return None


def _traceparent(context) -> str | None:
    """The client's W3C traceparent from the call's metadata, or None."""
    for key, value in context.invocation_metadata() or ():
        if key == TRACEPARENT:
            return value
    return None


def encode_response(
    entry: ModelView,
    request: Request,
    result: Response,
    refs: dict[str, SharedMemoryLease] | None = None,
) -> pb.ModelInferResponse:
    """The response to `request`: the outputs it asked for (selected by the engine), from the
    version that served it. `refs`: outputs to write into shared memory, by their leased
    regions (they carry no bytes in the response)."""
    config = entry.config
    response = pb.ModelInferResponse(
        model_name=config.name, model_version=result.model_version, id=request.id
    )
    blobs = []
    for name, array in result.outputs.items():
        datatype = tensors.output_datatype(config, name, array)
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        lease = refs.get(name) if refs else None
        blob = to_wire_bytes(array, datatype)
        if lease is None:
            blobs.append(blob)
            continue
        lease.write(blob, f"output '{name}'")
        ref = lease.ref
        tensor.parameters[tensors.SHM_REGION].string_param = ref.region
        tensor.parameters[tensors.SHM_BYTE_SIZE].int64_param = memoryview(blob).nbytes
        if ref.offset:
            tensor.parameters[tensors.SHM_OFFSET].int64_param = ref.offset
        blobs.append(b"")  # keeps raw_output_contents[i] beside outputs[i]
    # One entry per output, empty for those in shared memory: clients index the two lists
    # together (perf_analyzer's C++ client reads raw_output_contents[i] for outputs[i]).
    response.raw_output_contents.extend(blobs)
    return response


class GrpcFrontend(pb_grpc.GRPCInferenceServiceServicer):
    """Servicer: every handler maps ConvoyError onto its status, anything else onto INTERNAL."""

    def __init__(
        self,
        engine: EngineClient,
        tracer: Tracer | None = None,
    ) -> None:
        self.engine = engine
        self.tracer = tracer
        #: Set while shutdown begins: ModelInfer answers (served, or refused UNAVAILABLE) wait
        #: on it, so their clients send nothing new while the server stops listening; a call
        #: queued in gRPC's core at that moment would be cancelled (see FrontEnds._stop_grpc).
        self.held_answers: asyncio.Event | None = None
        #: ModelInfer calls being handled, and how many of them wait on `held_answers`.
        self.active_calls = 0
        self.held_count = 0
        self._memory = MemoryTrim()

    async def _hold(self) -> None:
        held = self.held_answers
        if held is not None and not held.is_set():
            self.held_count += 1
            await held.wait()

    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException):
        if isinstance(exc, Unavailable):
            await self._hold()
        code, _, message = status_of(exc)
        if not isinstance(exc, ConvoyError):
            log.error("gRPC handler failed", exc_info=exc)
        # Its frames may hold the request (a rejected message can be 256 MiB): let them go now.
        exc.__traceback__ = None
        trailers = ()
        if isinstance(exc, Overloaded):
            # gRFC A6 server pushback: how long a retrying client should wait.
            trailers = (("grpc-retry-pushback-ms", str(max(int(exc.retry_after * 1000), 1))),)
        await context.abort(grpc.StatusCode[code], message, trailing_metadata=trailers)

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _answer(self, context, build):
        try:
            return build()
        except Exception as exc:
            await self._abort(context, exc)

    # --- health / metadata -------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.engine.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.engine.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.engine.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(self.engine.server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request, context):
        return await self._answer(
            context,
            lambda: json_format.ParseDict(
                self.engine.model_metadata(request.name, request.version),
                pb.ModelMetadataResponse(),
            ),
        )

    async def ModelConfig(self, request, context):
        return await self._answer(
            context,
            lambda: pb.ModelConfigResponse(
                config=self.engine.model_config(request.name, request.version)
            ),
        )

    async def ModelStatistics(self, request, context):
        key = current_key()
        try:
            answer = await self.engine.model_statistics(request.name, request.version)
            if key is not None:  # all models: only those the key may use
                answer["model_stats"] = [s for s in answer["model_stats"] if key.allows(s["name"])]
            return json_format.ParseDict(answer, pb.ModelStatisticsResponse())
        except Exception as exc:
            await self._abort(context, exc)

    # --- repository ----------------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        key = current_key()
        try:
            rows = await self.engine.repository_index(request.ready)
        except Exception as exc:
            await self._abort(context, exc)
        if key is not None:  # only the models the key may use
            rows = [row for row in rows if key.allows(row["name"])]
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows]
        )

    async def RepositoryModelLoad(self, request, context):
        try:
            parameters = {k: _parameter(v) for k, v in request.parameters.items()}
            await self.engine.load_model(request.model_name, parameters)
            return pb.RepositoryModelLoadResponse()
        except Exception as exc:
            await self._abort(context, exc)

    async def RepositoryModelUnload(self, request, context):
        try:
            await self.engine.unload_model(request.model_name)
            return pb.RepositoryModelUnloadResponse()
        except Exception as exc:
            await self._abort(context, exc)

    # --- inference -------------------------------------------------------------------------------
    async def _infer(
        self,
        message: pb.ModelInferRequest,
        deadline: float | None,
        traceparent: str | None = None,
        principal: str | None = None,
        stream=None,
        context=None,
    ):
        """Decode, queue and await one request; a cancelled await leaves the queue too.
        `stream`: where a decoupled model's responses go (ModelStreamInfer); None: unary.
        `context`: the call's, for the metadata a roll-out may split callers by."""
        leases: list = []  # the shared-memory regions the request names, held until answered
        try:
            return await self._infer_leased(
                message, deadline, traceparent, principal, stream, context, leases
            )
        finally:
            for lease in leases:
                lease.release()

    async def _infer_leased(self, message, deadline, traceparent, principal, stream, context, leases):
        future = asyncio.get_running_loop().create_future()
        entry, request = decode_request(self.engine, message, future, deadline, principal, leases)
        if entry.split_header and context is not None:
            request.split_key = _metadata_value(context, entry.split_header)
        refs = output_leases(self.engine, message, leases) if message.outputs else None
        if entry.config.decoupled:
            if stream is None:
                raise InvalidInput(DECOUPLED_UNARY)
            request.stream = stream_sink(entry, request, message, stream, encode_response)
        self.engine.submit(entry, request)
        try:
            result = await future
        except asyncio.CancelledError:
            self.engine.cancel(entry, request)
            raise
        finally:
            if self.tracer is not None:
                self.tracer.record(
                    "grpc", entry.config.name, str(entry.version), request, future, traceparent
                )
        if request.stream is not None:
            return None  # its responses went out through the stream
        response = encode_response(entry, request, result, refs)
        if result.parameters:  # set by the model (a Triton python model's response parameters)
            for key, value in result.parameters.items():
                set_parameter(response.parameters, key, value)
        return response

    async def ModelInfer(self, request, context):
        key = current_key()
        principal = None if key is None else key.name
        self.active_calls += 1
        try:
            response = await self._infer(
                request,
                self._deadline(context),
                None if self.tracer is None else _traceparent(context),
                principal,
                context=context,
            )
            await self._hold()
            return response
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = exc
        finally:
            self.active_calls -= 1
        # Aborted outside the except block, and _abort drops the failure's traceback: its frames
        # hold the request message, and an abort raised inside the block would chain the failure
        # to the AbortError that gRPC keeps in a reference cycle, so a rejected 200 MiB message
        # would stay in memory until the cyclic collector happened to run.
        del request
        self._memory.soon()  # the allocator keeps a large rejected message's pages otherwise
        await self._abort(context, failure)

    async def ModelStreamInfer(self, request_iterator, context):
        """Responses go out as each request completes; an error answers that request only,
        unless the call's metadata holds `triton_grpc_error: true` (Triton's header): then the
        first error ends the stream with its status. With API keys, the call needs a valid key
        and each request a model in its scope."""
        key = current_key()
        principal = None if key is None else key.name
        grpc_errors = _wants_grpc_errors(context)
        # Backpressure: at most STREAM_BACKLOG requests read but not yet answered on the wire.
        # A client that never reads its answers stops being read (HTTP/2 flow control then
        # stops its sending) instead of piling answers up in memory.
        unanswered = asyncio.Semaphore(STREAM_BACKLOG)
        answers: asyncio.Queue = asyncio.Queue(STREAM_BACKLOG)
        pending: set[asyncio.Task] = set()
        deadline = self._deadline(context)
        traceparent = None if self.tracer is None else _traceparent(context)

        async def serve_one(message) -> None:
            try:
                if key is not None:
                    key.require(message.model_name)
                response = await self._infer(
                    message, deadline, traceparent, principal, answers.put_nowait, context
                )
                if response is not None:
                    # A model that is not decoupled answers once: its last response.
                    response.parameters[FINAL_FLAG].bool_param = True
                    await answers.put(pb.ModelStreamInferResponse(infer_response=response))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await answers.put(StreamFailure(status_of(exc)[0], self._stream_error(message, exc)))

        async def read() -> None:
            messages = request_iterator.__aiter__()
            while True:
                await unanswered.acquire()
                try:
                    message = await messages.__anext__()
                except StopAsyncIteration:
                    return
                task = asyncio.create_task(serve_one(message))
                pending.add(task)
                task.add_done_callback(pending.discard)

        reader = asyncio.create_task(read())
        failure: tuple[str, str] | None = None
        try:
            while True:
                if reader.done() and not pending and answers.empty():
                    break
                getter = asyncio.ensure_future(answers.get())
                waiting = {getter, reader} if not reader.done() else {getter, *pending}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                answer = getter.result()
                unanswered.release()
                code = ""
                if type(answer) is StreamFailure:
                    code, answer = answer
                if code and grpc_errors:
                    failure = (code, answer.error_message)
                    break
                yield answer
            if failure is None:
                reader.result()
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()
        if failure is not None:
            # Triton's triton_grpc_error mode: the stream ends with the error's status.
            await context.abort(grpc.StatusCode[failure[0]], failure[1])

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

    # --- logging ----------------------------------------------------------------------------------
    async def LogSettings(self, request, context):
        """No settings in the request reads them; any given are applied (all or nothing)."""

        try:
            changes = {key: _parameter(value) for key, value in request.settings.items()}
            if changes:
                current = await self.engine.update_log_settings(changes)
            else:
                current = self.engine.log_settings()
        except Exception as exc:
            await self._abort(context, exc)

        def build():
            response = pb.LogSettingsResponse()
            for key, value in current.items():
                setting = response.settings[key]
                if isinstance(value, bool):
                    setting.bool_param = value
                elif isinstance(value, int):
                    setting.uint32_param = value
                else:
                    setting.string_param = str(value)
            return response

        return await self._answer(context, build)

    # --- shared memory -----------------------------------------------------------------------------
    async def _control(self, context, call, build):
        """A shared-memory call (any valid key may make one: see interceptors.py)."""
        try:
            return build(await call)
        except Exception as exc:
            await self._abort(context, exc)

    async def SystemSharedMemoryStatus(self, request, context):
        def build(rows):
            response = pb.SystemSharedMemoryStatusResponse()
            for row in rows:
                response.regions[row["name"]].CopyFrom(
                    pb.SystemSharedMemoryStatusResponse.RegionStatus(**row)
                )
            return response

        call = self.engine.system_shared_memory_status(request.name)
        return await self._control(context, call, build)

    async def SystemSharedMemoryRegister(self, request, context):
        call = self.engine.register_system_shared_memory(
            request.name, request.key, request.offset, request.byte_size
        )
        return await self._control(context, call, lambda _: pb.SystemSharedMemoryRegisterResponse())

    async def SystemSharedMemoryUnregister(self, request, context):
        call = self.engine.unregister_system_shared_memory(request.name)
        return await self._control(context, call, lambda _: pb.SystemSharedMemoryUnregisterResponse())

    async def CudaSharedMemoryStatus(self, request, context):
        call = self.engine.cuda_shared_memory_status(request.name)
        return await self._control(context, call, lambda _: pb.CudaSharedMemoryStatusResponse())

    async def CudaSharedMemoryRegister(self, request, context):
        call = self.engine.register_cuda_shared_memory(request.name)
        return await self._control(context, call, lambda _: pb.CudaSharedMemoryRegisterResponse())

    async def CudaSharedMemoryUnregister(self, request, context):
        call = self.engine.unregister_cuda_shared_memory(request.name)
        return await self._control(context, call, lambda _: pb.CudaSharedMemoryUnregisterResponse())

    async def TraceSetting(self, request, context):
        """Triton's trace extension: no settings reads them; each given value list changes one
        (an empty list clears it back to the global or start-up value)."""
        try:
            changes = {key: (list(value.value) or None) for key, value in request.settings.items()}
            if changes:
                current = await self.engine.update_trace_settings(request.model_name, changes)
            else:
                current = self.engine.trace_settings(request.model_name)
            response = pb.TraceSettingResponse()
            for key, value in current.items():
                values = value if isinstance(value, list) else [value]
                response.settings[key].value.extend(values)
            return response
        except Exception as exc:
            await self._abort(context, exc)


def interceptor_chain(interceptors=(), keys: Keyring | None = None) -> list:
    """Every call's interceptors, outermost first (both front ends run the same chain): an
    undecodable message is answered before anything else sees it; `interceptors` (the access
    log); with `keys`, the key check innermost, next to the handler."""
    chain = [DecodeErrorInterceptor(), *interceptors]
    if keys is not None:
        chain.append(ApiKeyInterceptor(keys))
    return chain


async def start_grpc_server(
    engine: EngineClient,
    host: str,
    port: int,
    max_message_bytes: int,
    interceptors=(),
    tracer: Tracer | None = None,
    keys: Keyring | None = None,
    credentials: grpc.ServerCredentials | None = None,
    reuse_port: bool = False,
    max_connections: int = 0,
    handshake_timeout: float = 0.0,
) -> tuple[grpc.aio.Server, GrpcFrontend, int]:
    """Start the server on the running loop; returns it, its servicer and the port it bound.
    With `credentials` the port speaks TLS only. `reuse_port`: share the port with the other
    --workers processes (SO_REUSEPORT). With `keys`, every call's key is checked first (the
    interceptor in interceptors.py): handlers read it with current_key(). `max_connections`:
    connections past it are closed at once (0: no cap); `handshake_timeout`: seconds a new
    connection gets to finish its HTTP/2 (and TLS) handshake (0: gRPC's default, 120 s)."""
    interceptors = interceptor_chain(interceptors, keys)
    limits = []
    if max_connections > 0:
        limits.append(("grpc.max_allowed_incoming_connections", max_connections))
    if handshake_timeout > 0:
        limits.append(("grpc.server_handshake_timeout_ms", int(handshake_timeout * 1000)))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", int(reuse_port)),
            *limits,
        ],
    )
    frontend = GrpcFrontend(engine, tracer)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(frontend, server)
    try:
        if credentials is not None:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
        else:
            bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"gRPC could not bind {host}:{port} (address in use?)")
    await server.start()
    return server, frontend, bound
