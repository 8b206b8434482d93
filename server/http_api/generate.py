"""Triton's generate extension over HTTP: `POST /v2/models/{m}[/versions/{v}]/generate` and
`/generate_stream` (server-sent events).

The body is one JSON object: a key per model input (a value or a list, one request of batch 1),
optional `id` and `parameters`. An answer is a JSON object with model_name, model_version and a
key per output (a scalar when it holds one element, else a flat list). `/generate_stream` sends
each of a decoupled model's responses as its own `data: {...}` event as the model produces it
(a model that is not decoupled sends one); an error ends the stream as `data: {"error": "..."}`.
A client that disconnects cancels its request (a decoupled model sees `is_cancelled()`).
"""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import orjson

from convoy.errors import ConvoyError, InferenceFailed, InvalidInput, status_of
from convoy.outputs import select_outputs
from convoy.server import codec as tensors
from convoy.types import Request, StreamedResponse

_RESERVED = ("id", "parameters")
_DONE = object()


def _flatten(value) -> list:
    if not isinstance(value, list):
        return [value]
    flat: list = []
    stack = [iter(value)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _input_array(config, spec, value) -> np.ndarray:
    flat = _flatten(value)
    dims = list(spec.dims)
    variable = [i for i, d in enumerate(dims) if d == -1]
    if len(variable) > 1:
        raise InvalidInput(
            f"generate: input '{spec.name}' has {len(variable)} variable dimensions {dims}; "
            "send it through /infer with an explicit shape"
        )
    if variable:
        known = math.prod(d for d in dims if d != -1) or 1
        dims[variable[0]] = len(flat) // known
    shape = [1, *dims] if config.max_batch_size > 0 else dims
    tensors.check_shape(config, spec, spec.datatype, shape)
    array = tensors.from_json(spec, spec.datatype, shape, flat)
    return tensors.apply_reshape(config, spec, array)


def _answer(
    entry, outputs: dict, parameters: dict | None = None, request_id: str = "", version: str = ""
) -> dict:
    """`version`: the one that served it (a roll-out's arm), else the resolved one."""
    answer = {"model_name": entry.config.name, "model_version": version or str(entry.version)}
    if request_id:
        answer["id"] = request_id
    selected = select_outputs(outputs, (), entry.config)
    if isinstance(selected, ConvoyError):
        raise selected
    for name, array in selected.items():
        datatype = tensors.output_datatype(entry.config, name, array)
        values = array.reshape(-1).tolist()
        if datatype == "BYTES":
            values = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
        answer[name] = values[0] if len(values) == 1 else values
    if parameters:
        answer["parameters"] = parameters
    return answer


def header_value(scope, name: str) -> str | None:
    """The request header `name` (lower case), decoded, or None."""
    wanted = name.encode("latin-1")
    for key, value in scope["headers"]:
        if key == wanted:
            return value.decode("latin-1")
    return None


def build_request(engine, model: str, version: str, document: dict, future, principal):
    entry = engine.resolve(model, version)
    config = entry.config
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("generate: 'parameters' must be a JSON object")
    names = {spec.name for spec in config.inputs}
    unknown = sorted(k for k in document if k not in names and k not in _RESERVED)
    if unknown:
        raise InvalidInput(
            f"generate: {unknown} are not inputs of model '{config.name}'; expected keys "
            f"{sorted(names)} (and optional 'id', 'parameters')"
        )
    inputs = {
        spec.name: _input_array(config, spec, document[spec.name])
        for spec in config.inputs
        if spec.name in document
    }
    request = Request(
        id=str(document.get("id", "")),
        inputs=inputs,
        requested_outputs=(),
        rows=tensors.check_complete(config, inputs),
        future=future,
        priority=tensors.non_negative_parameter(parameters, "priority"),
        timeout_us=tensors.non_negative_parameter(parameters, "timeout"),
        parameters=parameters,
        received_ns=time.monotonic_ns(),
        principal=principal,
    )
    return entry, request


async def generate(frontend, scope, receive, send, model: str, version: str, principal, stream: bool):
    """Serve /generate (stream=False) or /generate_stream (stream=True)."""
    engine = frontend.engine
    document = frontend._parse_json(await frontend._read_body(receive))
    future = asyncio.get_running_loop().create_future()
    entry, request = build_request(engine, model, version, document, future, principal)
    if entry.split_header:  # a roll-out splits this model's callers by a header
        request.split_key = header_value(scope, entry.split_header)
    scope["convoy.entry"] = entry
    scope["convoy.request_id"] = request.id
    items: asyncio.Queue = asyncio.Queue()  # unbounded: filled on the loop by the model's responses
    if entry.config.decoupled:
        request.stream = items.put_nowait
    engine.submit(entry, request)
    watcher = asyncio.ensure_future(receive())

    def on_disconnect(done: asyncio.Future) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        if done.result().get("type") == "http.disconnect":
            engine.cancel(entry, request)
            future.cancel()  # a running decoupled request sees is_cancelled()
            items.put_nowait(_DONE)

    watcher.add_done_callback(on_disconnect)
    future.add_done_callback(lambda _: items.put_nowait(_DONE))
    try:
        if stream:
            await _stream(send, entry, request, future, items)
        else:
            await _unary(frontend, send, entry, request, future, items)
    finally:
        watcher.cancel()
        if not future.done():
            future.cancel()


async def _unary(frontend, send, entry, request, future, items) -> None:
    if not entry.config.decoupled:
        result = await future
        answer = _answer(entry, result.outputs, result.parameters, request.id, result.model_version)
        return await frontend._json(send, answer)
    responses: list[StreamedResponse] = []
    while True:
        item = await items.get()
        if item is _DONE:
            break
        if item.error:
            raise InferenceFailed(item.error)
        if item.outputs:
            responses.append(item)
    await future  # raises the request's error, if any
    if len(responses) != 1:
        raise InvalidInput(
            f"generate: model '{entry.config.name}' sent {len(responses)} responses; /generate "
            "returns exactly one, use /generate_stream for a stream"
        )
    answer = _answer(entry, responses[0].outputs, responses[0].parameters, request.id)
    await frontend._json(send, answer)


async def _stream(send, entry, request, future, items) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
        }
    )

    async def event(value: dict) -> None:
        body = b"data: " + orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"
        await send({"type": "http.response.body", "body": body, "more_body": True})

    try:
        if entry.config.decoupled:
            while True:
                item = await items.get()
                if item is _DONE:
                    break
                if item.error:
                    await event({"error": item.error})
                    continue
                if item.outputs:
                    await event(_answer(entry, item.outputs, item.parameters, request.id))
            if not future.cancelled():
                future.result()  # raises the request's error, if any
        else:
            result = await future
            await event(
                _answer(entry, result.outputs, result.parameters, request.id, result.model_version)
            )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        _, _, message = status_of(exc)
        await event({"error": message})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
