"""Inference requests the native front end parsed and checked, submitted to the engine as
`Request`s whose tensors are numpy views of the received bytes; their outcomes go back as
answers, every answer of a loop turn in one call.

Per request this costs the Python side a key check (when keys are on), the version's
resolution, one numpy view per input, the Request and its outcome; the scheduler does the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from convoy.auth import Keyring
from convoy.config import ModelConfig
from convoy.datatypes import NUMPY_DTYPE, deserialize_bytes, element_count, serialize_bytes
from convoy.engine.client import EngineClient, ModelView
from convoy.errors import ConvoyError, Overloaded, Unauthenticated, status_of
from convoy.server import codec as tensors
from convoy.server.observability.access_log import AccessLog
from convoy.server.observability.tracing import Tracer
from convoy.types import DirectOutcome, Request, Response

log = logging.getLogger("convoy.native")

#: Answer kinds (server/native/py/src/lib.rs `answer_from_python`).
OUTPUTS, FAILURE, MESSAGE, FINISHED, HTTP_HEAD, HTTP_BODY = range(6)


@dataclass(frozen=True, slots=True)
class InputPlan:
    """What turning one checked input into its array needs."""

    dtype: np.dtype
    #: The config's `reshape` (batch dimension kept in front for batching models), or None.
    reshape: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """One config as the native table was built from it (its token), and its inputs' plans."""

    config: ModelConfig
    inputs: dict[str, InputPlan]
    batched: bool
    #: Declared outputs: name -> (datatype, numpy dtype it travels in).
    outputs: dict[str, tuple[str, np.dtype]]


def model_plan(config: ModelConfig) -> ModelPlan:
    return ModelPlan(
        config,
        {spec.name: InputPlan(NUMPY_DTYPE[spec.datatype], spec.reshape) for spec in config.inputs},
        config.max_batch_size > 0,
        {spec.name: (spec.datatype, NUMPY_DTYPE[spec.datatype]) for spec in config.outputs},
    )


def failure(slot: int, exc: BaseException, fatal: bool = False) -> tuple:
    """The answer for a refused or failed request, by convoy/errors.py's table."""
    code, http_status, message = status_of(exc)
    retry = None
    if isinstance(exc, Overloaded):
        retry = max(int(exc.retry_after * 1000), 1)
    return (slot, FAILURE, grpc.StatusCode[code].value[0], http_status, message, retry, fatal)


def output_tuples(plan: ModelPlan, outputs: dict[str, np.ndarray]) -> list[tuple]:
    """(name, datatype, shape, wire data) per output; numeric arrays go as they are (the native
    side copies them once, into the response)."""
    rows = []
    declared = plan.outputs
    for name, array in outputs.items():
        found = declared.get(name)
        if found is None:
            datatype = tensors.output_datatype(plan.config, name, array)
            dtype = NUMPY_DTYPE[datatype]
        else:
            datatype, dtype = found
        if datatype == "BYTES":
            data = serialize_bytes(array)
        elif array.dtype == dtype:
            data = array
        else:
            data = np.ascontiguousarray(array, dtype=dtype)
        rows.append((name, datatype, array.shape, data))
    return rows


class Outcome(DirectOutcome):
    """A native request's future: its outcome becomes an answer in this loop turn's batch."""

    __slots__ = ("calls", "entry", "plan", "protocol", "request", "slot", "started_ns", "traceparent")

    def __init__(
        self, calls: NativeCalls, slot: int, entry: ModelView, protocol: str, plan: ModelPlan
    ) -> None:
        # DirectOutcome's state, set here: one call less on every request.
        self._done = self._cancelled = False
        self._result = self._error = self._callbacks = None
        self.plan = plan
        self.calls = calls
        self.slot = slot
        self.entry = entry
        self.protocol = protocol
        self.request: Request | None = None
        self.started_ns = 0
        self.traceparent: str | None = None

    def _deliver(self, result: Response | None, error: BaseException | None) -> None:
        self.calls.finished(self, result, error)


class NativeCalls:
    """Turns checked calls into engine Requests and their outcomes into answers."""

    def __init__(
        self,
        engine: EngineClient,
        answer: Callable[[tuple], None],
        keys: Keyring | None,
        access_log: AccessLog | None,
        tracer: Tracer | None,
    ) -> None:
        self.engine = engine
        #: Queues one answer for this loop turn's batch.
        self.answer = answer
        self.keys = keys
        self.access_log = access_log
        self.tracer = tracer
        #: Model plans by the token the native table knows their config by.
        self.plans: dict[int, ModelPlan] = {}
        #: Requests in progress by slot (a client going away names its slot).
        self.pending: dict[int, Outcome] = {}

    def start(self, item: tuple) -> None:
        """One checked call (an item of kind 0) into the engine."""
        (
            _,
            slot,
            protocol,
            model,
            version,
            request_id,
            token,
            rows,
            inputs,
            outputs,
            parameters,
            received_ns,
            deadline_ns,
            authorization,
            traceparent,
            split_key,
        ) = item
        try:
            principal = None
            if self.keys is not None:
                principal = self.keys.authorize(authorization, model).name
            entry = self.engine.resolve(model, version)
            config = entry.config
            plan = self.plans.get(token)
            if plan is not None and plan.config is config:
                arrays = self._arrays(plan, inputs)
            else:  # the model changed since the native side checked: check again here
                arrays = self._checked_arrays(config, inputs)
                rows = tensors.check_complete(config, arrays)
                outputs = tensors.check_requested_outputs(config, outputs)
                plan = model_plan(config)
            outcome = Outcome(self, slot, entry, protocol, plan)
            deadline = None if deadline_ns is None else deadline_ns / 1e9
            request = tensors.build_request(
                request_id,
                arrays,
                outputs,
                rows,
                parameters,
                outcome,
                received_ns,
                principal,
                deadline,
            )
        except Exception as exc:
            fatal = protocol == "grpc-stream" and isinstance(exc, Unauthenticated)
            self.answer(failure(slot, exc, fatal))
            if not isinstance(exc, ConvoyError):
                log.error("native inference request failed", exc_info=exc)
            self._log_refusal(protocol, model, version, request_id, received_ns, exc)
            return
        if split_key is not None and entry.split_header:
            request.split_key = split_key  # the header the model's roll-out splits callers by
        outcome.request = request
        outcome.started_ns = received_ns
        outcome.traceparent = traceparent
        self.pending[slot] = outcome
        self.engine.submit(entry, request)

    @staticmethod
    def _arrays(plan: ModelPlan, inputs: list) -> dict[str, np.ndarray]:
        arrays = {}
        for name, datatype, shape, data in inputs:
            spec = plan.inputs[name]
            if datatype == "BYTES":
                array = deserialize_bytes(data, element_count(shape), name).reshape(shape)
            else:
                # A view of the received bytes, read-only: no copy until the batch buffer.
                array = np.ndarray(shape, spec.dtype, data)
            if spec.reshape is not None:
                array = array.reshape((shape[0], *spec.reshape) if plan.batched else spec.reshape)
            arrays[name] = array
        return arrays

    @staticmethod
    def _checked_arrays(config: ModelConfig, inputs: list) -> dict[str, np.ndarray]:
        arrays = {}
        for name, datatype, shape, data in inputs:
            spec = tensors.input_spec(config, name)
            shape = list(shape)
            tensors.check_shape(config, spec, datatype, shape)
            array = tensors.from_raw(spec, datatype, shape, data)
            arrays[name] = tensors.apply_reshape(config, spec, array)
        return arrays

    def cancel(self, slot: int) -> bool:
        """The client went away: the request leaves its queue (a running one sees is_cancelled)."""
        outcome = self.pending.pop(slot, None)
        if outcome is None:
            return False
        if outcome.request is not None:
            self.engine.cancel(outcome.entry, outcome.request)
        outcome.cancel()
        return True

    def finished(self, outcome: Outcome, result: Response | None, error: BaseException | None) -> None:
        slot = outcome.slot
        cancelled = self.pending.pop(slot, None) is None
        if not cancelled:
            if error is None:
                outputs = output_tuples(outcome.plan, result.outputs)
                self.answer((slot, OUTPUTS, result.model_version, outputs, result.parameters))
            else:
                if not isinstance(error, ConvoyError):
                    log.error("native inference request failed", exc_info=error)
                self.answer(failure(slot, error))
        request = outcome.request
        if request is None:
            return
        # The request holds its outcome (its future): dropping the way back breaks the cycle,
        # so both are freed by reference counting at once, not by the cyclic collector later
        # (measured: ~25k objects per second left to it at 10k requests/s).
        outcome.request = None
        if self.access_log is not None:
            self._log_outcome(outcome, request, result, error)
        if self.tracer is not None:
            protocol = "http" if outcome.protocol == "http" else "grpc"
            entry = outcome.entry
            # The version that answered (a roll-out may route to another than resolved).
            version = result.model_version if result is not None else str(entry.version)
            self.tracer.record(
                protocol, entry.config.name, version, request, outcome, outcome.traceparent
            )

    # --- the access log: the lines the Python front end's middleware and interceptor write ----
    def _log_outcome(self, outcome: Outcome, request: Request, result: Response | None, error) -> None:
        version = result.model_version if result is not None else str(outcome.entry.version)
        status = self._status(outcome.protocol, outcome.cancelled(), error)
        self.access_log.write(
            outcome.protocol,
            outcome.entry.config.name,
            version,
            status,
            (time.monotonic_ns() - outcome.started_ns) // 1000,
            request.id,
            request.principal,
        )

    @staticmethod
    def _status(protocol: str, cancelled: bool, error: BaseException | None) -> str:
        if protocol == "http":
            return "499" if cancelled else str(status_of(error)[1]) if error is not None else "200"
        if protocol == "grpc-stream":
            return "ERROR" if error is not None or cancelled else "OK"
        return "CANCELLED" if cancelled else status_of(error)[0] if error is not None else "OK"

    def _log_refusal(self, protocol, model, version, request_id, received_ns, exc) -> None:
        if self.access_log is None:
            return
        principal = None
        self.access_log.write(
            protocol,
            model,
            version,
            self._status(protocol, False, exc),
            (time.monotonic_ns() - received_ns) // 1000,
            request_id,
            principal,
        )
