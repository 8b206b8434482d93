"""Model code calling other models of this server (Triton's BLS), through their schedulers.

A call becomes an ordinary `Request` submitted through `InferenceService.submit` (the path both
front ends use), so it batches with the model's other traffic, counts in its statistics and
honours its queue policy. Inputs are checked against the callee's declared inputs here, as a
front end's codec would.

Deadlock rule: a model's instance waits while its BLS call runs, so models that call each
other in a cycle (A -> A, or A -> B while B -> A) could each hold the instance the other waits
for. Convoy keeps the graph of which model has called which (learned from the calls made from
`execute`/`initialize`) and refuses, with InvalidInput naming the cycle, any call that would
close a cycle in it. The graph stays acyclic, every wait points further down it and the models
at its bottom never wait, so BLS cannot deadlock the schedulers. The caller is known from the
executing model (`ModelCall.callers`, last = the immediate caller); calls from threads a model
starts itself carry none and are not tracked (they hold no instance).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np

from convoy.datatypes import NUMPY_DTYPE
from convoy.errors import InvalidInput, Unavailable
from convoy.types import ModelCall, Request, Response, StreamedResponse


class LocalModelCaller:
    """`convoy.types.ModelCaller` over this process's repository and InferenceService."""

    def __init__(self, repository) -> None:
        self._repository = repository
        #: The InferenceService, once the server built it (before that, calls go straight to
        #: the callee's scheduler).
        self.service = None
        #: The server's event loop (set with the repository's services).
        self.loop = None
        #: caller model -> models it has called (BLS), kept acyclic (the deadlock rule).
        self._edges: dict[str, set[str]] = {}
        self._edges_lock = threading.Lock()

    def _request(self, call: ModelCall, future, stream) -> tuple:
        service = self.service or _SchedulerSubmit()
        entry = self._repository.get(call.model_name, call.model_version)
        config = entry.config
        if call.callers:
            self._add_edge(call.callers[-1], config.name)
        if config.decoupled and stream is None:
            raise InvalidInput(
                f"model '{config.name}' is decoupled: call it with exec(decoupled=True) / "
                "async_exec(decoupled=True)"
            )
        rows = _check_inputs(config, call.inputs)
        declared = {s.name for s in config.outputs}
        for name in call.requested_outputs:
            if declared and name not in declared:
                raise InvalidInput(
                    f"requested output '{name}' is not an output of model '{config.name}'; "
                    f"expected one of {sorted(declared)}"
                )
        request = Request(
            id=call.request_id,
            inputs=call.inputs,
            requested_outputs=call.requested_outputs,
            rows=rows,
            future=future,
            timeout_us=call.timeout_us,
            parameters=dict(call.parameters),
            received_ns=time.monotonic_ns(),
            stream=stream,
            callers=(*call.callers, config.name) if call.callers else (config.name,),
        )
        return service, entry, request

    def _add_edge(self, caller: str, callee: str) -> None:
        """Record caller -> callee, refusing an edge that closes a cycle of BLS calls."""
        with self._edges_lock:
            known = self._edges.get(caller)
            if known is not None and callee in known:
                return
            path = self._path(callee, caller)
            if path is not None:
                cycle = " -> ".join((caller, *path))
                raise InvalidInput(
                    f"BLS call from model '{caller}' to model '{callee}' refused: it would close "
                    f"a cycle of models calling each other ({cycle}), which can deadlock their "
                    "instances"
                )
            self._edges.setdefault(caller, set()).add(callee)

    def _path(self, start: str, goal: str) -> list[str] | None:
        """Models from `start` to `goal` along recorded calls (both included), or None."""
        if start == goal:
            return [start]
        seen = {start}
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for following in self._edges.get(node, ()):
                if following == goal:
                    return [*path, following]
                if following not in seen:
                    seen.add(following)
                    stack.append((following, [*path, following]))
        return None

    def submit_threadsafe(self, call: ModelCall, future) -> Callable[[], None]:
        service, entry, request = self._request(call, future, None)
        loop = self.loop
        loop.call_soon_threadsafe(service.submit, entry, request)

        def cancel() -> None:
            if entry.scheduler is not None:
                loop.call_soon_threadsafe(entry.scheduler.cancel, request)

        return cancel

    async def infer(self, call: ModelCall) -> Response:
        future = asyncio.get_running_loop().create_future()
        service, entry, request = self._request(call, future, None)
        service.submit(entry, request)
        try:
            response = await future
        except asyncio.CancelledError:
            if entry.scheduler is not None:
                entry.scheduler.cancel(request)
            raise
        return _requested(response, call.requested_outputs)

    async def infer_stream(self, call: ModelCall, sink: Callable[[StreamedResponse], None]) -> None:
        future = asyncio.get_running_loop().create_future()
        entry = self._repository.get(call.model_name, call.model_version)
        stream = sink if entry.config.decoupled else None
        service, entry, request = self._request(call, future, stream)
        service.submit(entry, request)
        try:
            response = await future
        except asyncio.CancelledError:
            if entry.scheduler is not None:
                entry.scheduler.cancel(request)
            raise
        if stream is None:  # a model that is not decoupled: its one response is the final
            response = _requested(response, call.requested_outputs)
            sink(StreamedResponse(response.outputs, True, "", response.parameters or {}))
        # A decoupled model's final flag already reached the sink (with the request's stream).


class _SchedulerSubmit:
    """Before the server's InferenceService exists (models warming up at start-up), calls go
    straight to the callee's scheduler; a callee still loading answers Unavailable."""

    @staticmethod
    def submit(entry, request: Request) -> None:
        try:
            if entry.scheduler is None:
                raise Unavailable(f"model '{entry.config.name}' is not ready")
            entry.scheduler.submit(request)
        except Unavailable as exc:
            request.future.set_exception(exc)
        except Exception as exc:
            if not request.future.done():
                request.future.set_exception(exc)


def _requested(response: Response, names: tuple[str, ...]) -> Response:
    if not names:
        return response
    outputs = {n: response.outputs[n] for n in names if n in response.outputs}
    return Response(outputs, response.model_name, response.model_version, None, response.parameters)


def _check_inputs(config, inputs: dict[str, np.ndarray]) -> int:
    """The rows the call carries; raises InvalidInput for what a front end would refuse."""
    rows = 1
    batched = config.max_batch_size > 0
    for name, array in inputs.items():
        spec = config.input(name)
        if spec is None:
            expected = ", ".join(f"'{s.name}'" for s in config.inputs)
            raise InvalidInput(
                f"unexpected input '{name}' for model '{config.name}'; expected inputs: {expected}"
            )
        wanted = NUMPY_DTYPE[spec.datatype]
        if (spec.datatype == "BYTES") != (array.dtype == object) or (
            spec.datatype != "BYTES" and array.dtype != wanted
        ):
            raise InvalidInput(
                f"input '{name}' of model '{config.name}': expected {spec.datatype}, got numpy "
                f"{array.dtype}"
            )
        shape = array.shape[1:] if batched else array.shape
        dims = spec.reshape if spec.reshape is not None and not batched else spec.dims
        if len(shape) != len(spec.dims) or any(
            d != -1 and d != s for s, d in zip(shape, spec.dims, strict=True)
        ):
            expected = [-1, *spec.dims] if batched else list(dims)
            raise InvalidInput(
                f"input '{name}' of model '{config.name}': expected shape {expected}, got "
                f"{list(array.shape)}"
            )
        if batched:
            if not array.ndim or array.shape[0] < 1:
                raise InvalidInput(f"input '{name}': batch dimension must be >= 1")
            if array.shape[0] > config.max_batch_size:
                raise InvalidInput(
                    f"input '{name}': batch size {array.shape[0]} exceeds max_batch_size "
                    f"{config.max_batch_size} of model '{config.name}'"
                )
            rows = array.shape[0]
    missing = [s.name for s in config.inputs if not s.optional and s.name not in inputs]
    if missing:
        raise InvalidInput(f"model '{config.name}' needs input(s) {missing}")
    if batched and len({a.shape[0] for a in inputs.values()}) > 1:
        raise InvalidInput(f"model '{config.name}': inputs disagree on the batch size")
    return rows
