"""The Open Inference Protocol over HTTP/1.1: a bare ASGI app served by uvicorn (httptools).

No web framework on the request path (DESIGN.md: Starlette routing cost ~40% of requests/s).
JSON via orjson; the binary tensor data extension (`Inference-Header-Content-Length`) for
inputs and outputs; gzip/deflate request and response bodies as tritonclient sends them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import logging
import math
import time
import zlib
from functools import partial
from importlib import resources

import numpy as np
import orjson

from convoy.datatypes import bf16_bits_to_float32, to_wire_bytes
from convoy.engine.client import EngineClient
from convoy.engine.rollout.report import render_html
from convoy.errors import ConvoyError, InvalidInput, ModelNotFound, status_of
from convoy.server import codec as tensors
from convoy.server.http_api.body_limits import BodyLimits, body_limits, check_claimed_values
from convoy.server.http_api.generate import generate, header_value
from convoy.server.observability.tracing import Tracer
from convoy.types import Request

log = logging.getLogger("convoy.http")

JSON = b"application/json"
HEADER_LENGTH = b"inference-header-content-length"
#: Default limit on the JSON part of an infer request (after decompression): JSON costs ~16x
#: its size to parse and convert, so it gets a smaller limit than binary bodies.
DEFAULT_MAX_JSON_BYTES = 16 * 1024 * 1024
#: Bodies at least this large (compressed: OFF_LOOP_BYTES // 64) are inflated, parsed and
#: converted on a decode thread, so one large request never stalls the other clients.
OFF_LOOP_BYTES = 256 * 1024
#: Model configs whose body limits are kept at once (far more than a server loads).
_LIMITS_CACHED = 1024
#: Decode threads, and so at most this many large bodies decoding at once (the others wait).
DECODE_THREADS = 2


#: The JSON document of a raw binary request (it has none): no id, no parameters, every output
#: returned in binary form.
RAW_DOCUMENT = {"parameters": {"binary_data_output": True}}


class BodyTooLarge(InvalidInput):
    """The request body is over the server's limit."""


def proto_to_dict(message) -> dict:
    """A protobuf message as Triton's HTTP API writes it: proto field names, 64-bit integers as
    JSON numbers, enums by name, scalar defaults included, unset sub-messages left out."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _field_value(value_field, v) for k, v in value.items()}
        elif _is_repeated(field):
            out[field.name] = [_field_value(field, v) for v in value]
        elif field.message_type is not None or field.containing_oneof is not None:
            if message.HasField(field.name):
                out[field.name] = _field_value(field, value)
        else:
            out[field.name] = _field_value(field, value)
    return out


def _is_repeated(field) -> bool:
    # protobuf 7 removed FieldDescriptor.label; older releases lack is_repeated.
    repeated = getattr(field, "is_repeated", None)
    return repeated if repeated is not None else field.label == field.LABEL_REPEATED


def _field_value(field, value):
    if field.message_type is not None:
        return proto_to_dict(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value


def _json_data(array: np.ndarray, datatype: str):
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [
            v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v) for v in flat
        ]
    if datatype == "BF16":
        return bf16_bits_to_float32(flat)
    return np.ascontiguousarray(flat)


async def _send(send, status: int, body: bytes, content_type: bytes = JSON, extra=()) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _closing(send, engine: EngineClient):
    """Once shutdown has begun, answers (requests in progress are still served) carry
    `Connection: close` so the client sends its next request on a new connection, which finds
    the listener gone."""

    async def closing_send(message) -> None:
        if message["type"] == "http.response.start" and not engine.accepting:
            headers = [h for h in message.get("headers", ()) if h[0].lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return closing_send


async def send_error(send, exc: BaseException, closing: bool = False) -> None:
    """The JSON error answer for any exception: its status, a client-safe message, and the
    headers that go with it (Retry-After, WWW-Authenticate; Connection: close while `closing`)."""
    _, http_status, message = status_of(exc)
    headers = []
    if http_status == 429:
        # Whole seconds (RFC 9110), at least 1: the scheduler's estimate of the drain.
        wait = math.ceil(getattr(exc, "retry_after", 1.0))
        headers.append((b"retry-after", str(max(wait, 1)).encode()))
    elif http_status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    elif http_status == 503 and closing:
        # Shutting down: this connection will not be served again; say so.
        headers.append((b"connection", b"close"))
    await _send(send, http_status, orjson.dumps({"error": message}), extra=headers)


class HttpFrontend:
    """ASGI application: routes by path segments, answers JSON errors, never a traceback."""

    def __init__(
        self,
        engine: EngineClient,
        max_body_bytes: int,
        tracer: Tracer | None = None,
        catalog=None,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    ) -> None:
        """`catalog`: a server.catalog.Catalog answering /catalog and /catalog.json, or None.
        `max_json_bytes`: limit on an infer request's JSON part (see body_limits.py)."""
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.max_json_bytes = max_json_bytes
        #: Body limits by model config (id -> (config, limits)): computed once per loaded
        #: config, not per request; the config is kept so a reused id never matches.
        self._limits: dict[int, tuple[object, BodyLimits]] = {}
        self._decoder = concurrent.futures.ThreadPoolExecutor(
            DECODE_THREADS, thread_name_prefix="convoy-http-decode"
        )
        self._decode_slots = asyncio.Semaphore(DECODE_THREADS)
        self.tracer = tracer
        self.catalog = catalog
        self._openapi = resources.files("convoy.server.http_api").joinpath("openapi.json").read_bytes()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        send = _closing(send, self.engine)
        try:
            await self._route(scope, receive, send)
        except Exception as exc:
            if not isinstance(exc, ConvoyError):
                log.exception("HTTP %s %s failed", scope["method"], scope["path"])
            await send_error(send, exc, closing=not self.engine.accepting)

    _send = staticmethod(_send)

    def close(self) -> None:
        """Stop the decode threads (after the HTTP server has stopped)."""
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def _json(self, send, value, status: int = 200) -> None:
        await self._send(send, status, orjson.dumps(value))

    async def _read_body(self, receive, limits: BodyLimits | None = None) -> bytes:
        """The whole body, refused as soon as it passes `limits.body` (default: the server's)."""
        limit = self.max_body_bytes if limits is None else limits.body
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionResetError("client disconnected")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    why = "the server's limit" if limits is None else limits.reason
                    raise BodyTooLarge(f"request body exceeds {limit} bytes ({why})")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _route(self, scope, receive, send) -> None:
        method = scope["method"]
        parts = scope["path"].strip("/").split("/")
        engine = self.engine
        if parts[0] == "openapi.json" or parts == ["v2", "openapi.json"]:
            return await self._send(send, 200, self._openapi)
        if parts[0] != "v2":
            if self.catalog is not None and len(parts) == 1 and parts[0] in ("catalog", "catalog.json"):
                self._expect(method, "GET", scope)
                return await self._catalog(scope, send, parts[0] == "catalog.json")
            raise ModelNotFound(f"no endpoint at {scope['path']}")
        rest = parts[1:]
        if not rest or rest == [""]:
            self._expect(method, "GET", scope)
            return await self._json(send, engine.server_metadata())
        head = rest[0]
        if head == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            self._expect(method, "GET", scope)
            ok = engine.live() if rest[1] == "live" else engine.ready()
            # The Open Inference Protocol's bodies: {"live": true} / {"ready": false}.
            return await self._json(send, {rest[1]: ok}, 200 if ok else 503)
        if head == "models":
            if rest[1:] == ["stats"]:
                self._expect(method, "GET", scope)
                key = scope.get("convoy.key")
                answer = await engine.model_statistics()
                if key is not None:  # only the models the key may use
                    answer["model_stats"] = [s for s in answer["model_stats"] if key.allows(s["name"])]
                return await self._json(send, answer)
            if len(rest) >= 2:
                return await self._model_route(scope, receive, send, rest[1], rest[2:])
        if head == "trace" and rest[1:] == ["setting"]:
            return await self._trace_setting(scope, receive, send, "")
        if head == "logging" and len(rest) == 1:
            if method == "GET":
                return await self._json(send, engine.log_settings())
            self._expect(method, "POST", scope)
            changes = self._parse_json(await self._read_body(receive))
            return await self._json(send, await engine.update_log_settings(changes))
        if head in ("systemsharedmemory", "cudasharedmemory"):
            return await self._shared_memory(scope, receive, send, head, rest[1:])
        if head == "rollouts":
            return await self._rollouts(scope, receive, send, rest[1:])
        if head == "repository":
            self._expect(method, "POST", scope)
            if rest[1:] == ["index"]:
                key = scope.get("convoy.key")
                body = await self._read_body(receive)
                ready_only = bool(self._parse_json(body).get("ready", False)) if body else False
                rows = await engine.repository_index(ready_only)
                if key is not None:  # only the models the key may use
                    rows = [row for row in rows if key.allows(row["name"])]
                return await self._json(send, rows)
            if len(rest) == 4 and rest[1] == "models" and rest[3] in ("load", "unload"):
                body = await self._read_body(receive)
                if rest[3] == "load":
                    parameters = self._parse_json(body).get("parameters") if body else None
                    if parameters is not None and not isinstance(parameters, dict):
                        raise InvalidInput("'parameters' must be a JSON object")
                    await engine.load_model(rest[2], parameters, base64_files=True)
                else:
                    await engine.unload_model(rest[2])
                return await self._send(send, 200, b"")
        raise ModelNotFound(f"no endpoint at {scope['path']}")

    async def _trace_setting(self, scope, receive, send, model: str) -> None:
        """Triton's trace extension: GET reads the settings, POST changes them (JSON object of
        setting -> string, list of strings or null to clear; an empty body changes nothing)."""
        method = scope["method"]
        if method == "GET":
            return await self._json(send, self.engine.trace_settings(model))
        self._expect(method, "POST", scope)
        body = await self._read_body(receive)
        changes = self._parse_json(body) if body.strip() else {}
        return await self._json(send, await self.engine.update_trace_settings(model, changes))

    async def _shared_memory(self, scope, receive, send, head: str, rest: list[str]) -> None:
        """Triton's shared-memory extension: status, register, unregister (one or all)."""
        engine = self.engine
        method = scope["method"]
        system = head == "systemsharedmemory"
        name = ""
        if len(rest) == 3 and rest[0] == "region":
            name, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else ""
        if action == "status":
            self._expect(method, "GET", scope)
            if system:
                return await self._json(send, await engine.system_shared_memory_status(name))
            return await self._json(send, await engine.cuda_shared_memory_status(name))
        if action == "unregister":
            self._expect(method, "POST", scope)
            await self._read_body(receive)
            if system:
                await engine.unregister_system_shared_memory(name)
            else:
                await engine.unregister_cuda_shared_memory(name)
            return await self._send(send, 200, b"")
        if action == "register" and name:
            self._expect(method, "POST", scope)
            document = self._parse_json(await self._read_body(receive))
            if not system:
                await engine.register_cuda_shared_memory(name)
            key = document.get("key")
            if not isinstance(key, str):
                raise InvalidInput("register: 'key' must be the shared memory segment's name")
            await engine.register_system_shared_memory(
                name, key, document.get("offset", 0), document.get("byte_size")
            )
            return await self._send(send, 200, b"")
        raise ModelNotFound(f"no endpoint at {scope['path']}")

    async def _rollouts(self, scope, receive, send, rest: list[str]) -> None:
        """The roll-out admin API (engine/rollout): list, status, start, promote, abort, report."""
        engine = self.engine
        method = scope["method"]
        if not rest or rest == [""]:
            self._expect(method, "GET", scope)
            answer = await engine.rollout_status()
            key = scope.get("convoy.key")
            if key is not None:  # only the models the key may use
                answer["rollouts"] = [r for r in answer["rollouts"] if key.allows(r["model"])]
            return await self._json(send, answer)
        name, action = rest[0], rest[1:]
        if not action:
            self._expect(method, "GET", scope)
            return await self._json(send, await engine.rollout_status(name))
        if len(action) == 1 and action[0] in ("start", "promote", "abort"):
            self._expect(method, "POST", scope)
            body = await self._read_body(receive)
            if action[0] == "start":
                if not body:
                    raise InvalidInput("rollout start: expected the roll-out's JSON spec as the body")
                try:
                    document = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    raise InvalidInput(f"request body is not valid JSON: {exc}") from None
                return await self._json(send, await engine.rollout_start(name, document))
            if action[0] == "promote":
                return await self._json(send, await engine.rollout_promote(name))
            return await self._json(send, await engine.rollout_abort(name))
        if action in (["report"], ["report.html"]):
            self._expect(method, "GET", scope)
            document = await engine.rollout_report(name)
            if action[0] == "report":
                return await self._json(send, document)
            page = render_html(document).encode()
            return await self._send(
                send, 200, page, b"text/html; charset=utf-8", [(b"cache-control", b"no-store")]
            )
        raise ModelNotFound(f"no endpoint at {scope['path']}")

    def _body_limits(self, config) -> BodyLimits:
        """What a request to `config`'s model may send (see body_limits.py), once per config."""
        cached = self._limits.get(id(config))
        if cached is not None and cached[0] is config:
            return cached[1]
        limits = body_limits(config, self.max_body_bytes, self.max_json_bytes)
        if len(self._limits) >= _LIMITS_CACHED:
            self._limits.clear()  # bounded: configs come and go with loads and roll-outs
        self._limits[id(config)] = (config, limits)
        return limits

    async def _catalog(self, scope, send, as_json: bool) -> None:
        host = ""
        for key, value in scope["headers"]:
            if key == b"host":
                host = value.decode("latin-1")
        server = scope.get("server") or ("", 0)
        # With API keys the catalog needs one too, and lists only the models it may use.
        key = scope.get("convoy.key")
        if key is None and self.catalog.keys_required:
            # Only a keyless GET /catalog gets here (the middleware): ask for the key.
            page = self.catalog.key_prompt.encode()
            return await self._send(
                send, 200, page, b"text/html; charset=utf-8", [(b"cache-control", b"no-store")]
            )
        allows = None if key is None else key.allows
        document = await self.catalog.document(host, server[1] or 0, allows)
        if as_json:
            return await self._json(send, document)
        page = self.catalog.page(document).encode()
        await self._send(send, 200, page, b"text/html; charset=utf-8", [(b"cache-control", b"no-store")])

    @staticmethod
    def _expect(method: str, wanted: str, scope) -> None:
        if method != wanted:
            raise InvalidInput(f"{scope['path']} accepts {wanted}, got {method}")

    async def _model_route(self, scope, receive, send, model: str, rest: list[str]) -> None:
        version = ""
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        method = scope["method"]
        engine = self.engine
        action = rest[0] if rest else ""
        if rest == ["trace", "setting"] and not version:
            return await self._trace_setting(scope, receive, send, model)
        if len(rest) > 1:
            raise ModelNotFound(f"no endpoint at {scope['path']}")
        principal = scope.get("convoy.principal")
        if action == "infer":
            self._expect(method, "POST", scope)
            return await self._infer(scope, receive, send, model, version, principal)
        if action in ("generate", "generate_stream"):
            self._expect(method, "POST", scope)
            streaming = action == "generate_stream"
            return await generate(self, scope, receive, send, model, version, principal, streaming)
        self._expect(method, "GET", scope)
        if action == "":
            return await self._json(send, engine.model_metadata(model, version))
        if action == "ready":
            ok = engine.model_ready(model, version)
            return await self._json(send, {"name": model, "ready": ok}, 200 if ok else 503)
        if action == "config":
            return await self._json(send, proto_to_dict(engine.model_config(model, version)))
        if action == "stats":
            return await self._json(send, await engine.model_statistics(model, version))
        raise ModelNotFound(f"no endpoint at {scope['path']}")

    @staticmethod
    def _parse_json(body) -> dict:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise InvalidInput("request body must be a JSON object")
        return document

    # --- inference ---------------------------------------------------------------------------------
    async def _infer(
        self, scope, receive, send, model: str, version: str, principal: str | None = None
    ) -> None:
        received = time.monotonic_ns()
        header_length = None
        encoding = accept = b""
        for key, value in scope["headers"]:
            if key == HEADER_LENGTH:
                header_length = value
            elif key == b"content-encoding":
                encoding = value.lower()
            elif key == b"accept-encoding":
                accept = value.lower()
        entry = self.engine.resolve(model, version)
        config = entry.config
        if config.decoupled:
            raise InvalidInput(
                f"model '{config.name}' is decoupled (model_transaction_policy): /infer returns one "
                "response; use /generate_stream (or gRPC ModelStreamInfer)"
            )
        # What the model's declared inputs can need bounds the body before it is parsed.
        limits = self._body_limits(config)
        body = await self._read_body(
            receive, BodyLimits(self.max_body_bytes, 0, "the server's limit") if encoding else limits
        )
        # Shared-memory regions the request names, held until it is answered.
        leases: list = []
        try:
            await self._infer_body(
                scope,
                receive,
                send,
                entry,
                body,
                encoding,
                header_length,
                limits,
                accept,
                received,
                principal,
                leases,
            )
        finally:
            for lease in leases:
                lease.release()

    async def _infer_body(
        self,
        scope,
        receive,
        send,
        entry,
        body,
        encoding,
        header_length,
        limits,
        accept,
        received,
        principal,
        leases,
    ) -> None:
        config = entry.config
        decode = partial(self._decode_body, config, body, encoding, header_length, limits, leases)
        if len(body) >= (OFF_LOOP_BYTES // 64 if encoding else OFF_LOOP_BYTES):
            async with self._decode_slots:
                document, inputs, rows = await asyncio.get_running_loop().run_in_executor(
                    self._decoder, decode
                )
        else:
            document, inputs, rows = decode()
        parameters = document.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput("'parameters' must be a JSON object")
        requested, binary_outputs = self._requested_outputs(config, document, parameters)
        out_leases = binary_outputs[2]
        for name, ref in list(out_leases.items()):
            out_leases[name] = lease = self.engine.lease_shared_memory(ref, f"output '{name}'")
            leases.append(lease)
        future = asyncio.get_running_loop().create_future()
        request = tensors.build_request(
            str(document.get("id", "")), inputs, requested, rows, parameters, future, received, principal
        )
        if entry.split_header:  # a roll-out splits this model's callers by a header
            request.split_key = header_value(scope, entry.split_header)
        # For the access log, when it is on (two dict stores otherwise unread).
        scope["convoy.entry"] = entry
        scope["convoy.request_id"] = request.id
        self.engine.submit(entry, request)
        # A client that hangs up takes its request out of the queue: watch for the disconnect
        # while the request waits, and stop watching once it is answered.
        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(partial(_on_disconnect, self.engine, entry, request))
        try:
            result = await future
            scope["convoy.served_version"] = result.model_version  # for the access log
        finally:
            watcher.cancel()
            if self.tracer is not None:
                self._trace(scope, entry, request, future)
        await self._respond(send, entry, request, result, binary_outputs, accept)

    def _trace(self, scope, entry, request: Request, future) -> None:
        traceparent = None
        for key, value in scope["headers"]:
            if key == b"traceparent":
                traceparent = value.decode("latin-1")
        self.tracer.record("http", entry.config.name, str(entry.version), request, future, traceparent)

    def _decode_body(
        self, config, body: bytes, encoding: bytes, header_length, limits: BodyLimits, leases: list
    ):
        """Inflate, split, parse and convert an infer body (on the loop or a decode thread):
        the JSON document, the input arrays and the batch rows. Shared-memory regions the inputs
        name are leased into `leases`."""
        if encoding:
            body = self._decompress(body, encoding, limits)
        if header_length is not None:
            try:
                split = int(header_length)
            except ValueError:
                raise InvalidInput("header Inference-Header-Content-Length must be an integer") from None
            if not 0 <= split <= len(body):
                raise InvalidInput(
                    f"header Inference-Header-Content-Length is {split} but the body has "
                    f"{len(body)} bytes"
                )
        else:
            split = len(body)
        if split > limits.json:
            raise BodyTooLarge(
                f"the request's JSON is {split} bytes; expected at most {limits.json} ({limits.reason})"
            )
        if header_length is not None and split == 0:
            # Triton's raw binary request: no JSON at all, the body is the only input's data.
            inputs, rows = tensors.decode_raw_binary(config, memoryview(body))
            return RAW_DOCUMENT, inputs, rows
        if header_length is not None:
            check_claimed_values(config, bytes(memoryview(body)[:split]))
            document = self._parse_json(memoryview(body)[:split])
            binary = memoryview(body)[split:]
        else:
            check_claimed_values(config, body)
            document = self._parse_json(body)
            binary = memoryview(b"")
        inputs, rows = self._decode_inputs(config, document, binary, self.engine, leases)
        return document, inputs, rows

    def _decompress(self, body: bytes, encoding: bytes, limits: BodyLimits) -> bytes:
        """Inflate a gzip/deflate body, no further than the limit a plain body has."""
        wbits = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}.get(encoding)
        name = encoding.decode("latin-1")  # a header may hold any byte
        if wbits is None:
            raise InvalidInput(f"Content-Encoding '{name}' is not supported; expected gzip or deflate")
        limit = limits.body
        parts = []
        size = 0
        data = body
        while data:  # one pass per gzip member (RFC 1952 allows several)
            inflater = zlib.decompressobj(wbits)
            try:
                part = inflater.decompress(data, limit + 1 - size)
            except zlib.error as exc:
                raise InvalidInput(f"request body is not valid {name} data: {exc}") from None
            size += len(part)
            if size > limit or inflater.unconsumed_tail:
                raise BodyTooLarge(f"decompressed request body exceeds {limit} bytes ({limits.reason})")
            if not inflater.eof:
                raise InvalidInput(f"request body is truncated {name} data")
            parts.append(part)
            data = inflater.unused_data if encoding == b"gzip" else b""
        return b"".join(parts)

    @staticmethod
    def _decode_inputs(config, document: dict, binary: memoryview, engine=None, leases=None):
        items = document.get("inputs")
        if not isinstance(items, list):
            raise InvalidInput("'inputs' must be a JSON list of tensors")
        inputs = {}
        offset = 0
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                raise InvalidInput(f"inputs[{position}] must be a JSON object")
            name = item.get("name")
            datatype = item.get("datatype")
            shape = item.get("shape")
            if not isinstance(name, str):
                raise InvalidInput(f"inputs[{position}].name must be a string")
            tensors.check_new_input(name, inputs)
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in shape
            ):
                raise InvalidInput(f"input '{name}': shape must be a list of integers")
            tensors.check_wire_shape(name, shape)
            params = item.get("parameters") or {}
            size = params.get("binary_data_size") if isinstance(params, dict) else None
            ref = tensors.shared_memory_ref(params, f"input '{name}'")
            tensors.check_data_source(
                name,
                config.name,
                shared_memory=ref is not None,
                inline="data" in item,
                binary=size is not None,
                inline_field="'data'",
                binary_field="binary_data_size",
            )
            spec = tensors.input_spec(config, name)
            tensors.check_shape(config, spec, datatype, shape)
            if ref is not None:
                what = f"input '{name}'"
                lease = engine.lease_shared_memory(ref, what)
                leases.append(lease)
                array = tensors.from_raw(spec, datatype, shape, lease.read(what))
            elif size is not None:
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise InvalidInput(
                        f"input '{name}': binary_data_size must be a non-negative integer"
                    )
                if offset + size > len(binary):
                    raise InvalidInput(
                        f"input '{name}': binary_data_size {size} runs past the "
                        f"{len(binary) - offset} binary bytes left in the body"
                    )
                array = tensors.from_raw(spec, datatype, shape, binary[offset : offset + size])
                offset += size
            else:
                data = item["data"]
                if not isinstance(data, list):
                    data = [data]
                # Counted before anything is converted: a huge list costs no more than the shape.
                tensors.check_value_count(spec, shape, data)
                if datatype == "BYTES":
                    data = _flatten(data)
                array = tensors.from_json(spec, datatype, shape, data)
            inputs[name] = tensors.apply_reshape(config, spec, array)
        if offset != len(binary):
            raise InvalidInput(f"body holds {len(binary) - offset} binary bytes that no input claims")
        return inputs, tensors.check_complete(config, inputs)

    @staticmethod
    def _requested_outputs(config, document: dict, parameters: dict):
        default_binary = bool(parameters.get("binary_data_output", False))
        items = document.get("outputs") or []
        if not isinstance(items, list):
            raise InvalidInput("'outputs' must be a JSON list")
        names = []
        binary = {}
        refs = {}
        for position, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidInput(f"outputs[{position}] must be an object with a string 'name'")
            params = item.get("parameters") or {}
            if not isinstance(params, dict):
                raise InvalidInput(f"output '{item['name']}': 'parameters' must be a JSON object")
            if params.get("classification"):
                raise InvalidInput(
                    f"output '{item['name']}': the classification extension is not supported"
                )
            names.append(item["name"])
            binary[item["name"]] = bool(params.get("binary_data", default_binary))
            ref = tensors.shared_memory_ref(params, f"output '{item['name']}'")
            if ref is not None:
                refs[item["name"]] = ref
        requested = tensors.check_requested_outputs(config, names)
        return requested, (binary, default_binary, refs)

    async def _respond(self, send, entry, request, result, binary_outputs, accept: bytes) -> None:
        """The response to `request`: the outputs it asked for (selected by the engine), from
        the version that served it, with any response parameters the model set."""
        outputs = result.outputs
        parameters = result.parameters
        per_output, default_binary, refs = binary_outputs
        described = []
        blobs = []
        config = entry.config
        for name, array in outputs.items():
            datatype = tensors.output_datatype(config, name, array)
            out = {"name": name, "datatype": datatype, "shape": list(array.shape)}
            lease = refs.get(name)
            if lease is not None:
                blob = to_wire_bytes(array, datatype)
                # No data and no parameters: clients read the region (Triton's C++ client
                # takes any output `parameters` to hold binary_data_size).
                lease.write(blob, f"output '{name}'")
            elif per_output.get(name, default_binary):
                blob = to_wire_bytes(array, datatype)
                out["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                out["data"] = _json_data(array, datatype)
            described.append(out)
        answer = {
            "model_name": entry.config.name,
            "model_version": result.model_version,
            "outputs": described,
        }
        if request.id:
            answer["id"] = request.id
        if parameters:  # set by the model (a Triton python model's response parameters)
            answer["parameters"] = parameters
        header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
        extra = []
        if blobs:
            body = b"".join([header, *blobs])
            extra.append((HEADER_LENGTH, str(len(header)).encode()))
            content_type = b"application/octet-stream"
        else:
            body = header
            content_type = JSON
        if accept and len(body) > 1024:
            if b"gzip" in accept:
                body = gzip.compress(body, compresslevel=1)
                extra.append((b"content-encoding", b"gzip"))
            elif b"deflate" in accept:
                body = zlib.compress(body, 1)
                extra.append((b"content-encoding", b"deflate"))
        await self._send(send, 200, body, content_type, extra)


def _on_disconnect(engine: EngineClient, entry, request: Request, watcher: asyncio.Future) -> None:
    if watcher.cancelled() or watcher.exception() is not None:
        return
    if watcher.result().get("type") == "http.disconnect":
        engine.cancel(entry, request)


def _flatten(values: list) -> list:
    flat = []
    stack = [iter(values)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat
