"""The messages on an isolated runtime worker's channel (runtimes/isolated.py): the server asks
its worker process to load, execute and close; the worker answers, and asks the server for the
BLS calls its model code makes meanwhile.

Encoded like every process boundary in Convoy (convoy/wire.py): msgspec Structs tagged with
their kind, built by keyword, in frames with the tensors' raw bytes beside them (each tensor a
TensorMeta in the message that carries it). Failures travel as `WorkerFailure`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from convoy.config import ModelVersionSource
from convoy.wire import TensorMeta


class WorkerFailure(msgspec.Struct, tag="failure", array_like=True, kw_only=True):
    """Something failed on one side of the channel: the exception's class name (`kind`) and
    message, and whether the worker can be trusted with another batch (`fatal`: the backend
    said no)."""

    kind: str
    message: str
    fatal: bool = False


# --- server -> worker ------------------------------------------------------------------------------
class Load(msgspec.Struct, tag="load", array_like=True, kw_only=True):
    """The first message: load `backend`'s model version (its typed config) as instance
    `instance_index`. Answered with `Loaded` or `WorkerFailure`."""

    backend: str
    source: ModelVersionSource
    instance_index: int


class Execute(msgspec.Struct, tag="execute", array_like=True, kw_only=True):
    """Execute one batch (Runtime.infer). Answered with `Outputs` or `WorkerFailure`."""

    inputs: list[TensorMeta]


class RequestInfo(msgspec.Struct, array_like=True, kw_only=True):
    """One request of an `ExecuteRequests` batch: what the model sees of it besides its rows."""

    id: str
    rows: int
    requested: tuple[str, ...]
    parameters: dict[str, Any]
    timeout_us: int
    bls_call: int


class ExecuteRequests(msgspec.Struct, tag="requests", array_like=True, kw_only=True):
    """Execute a per-request batch (a Triton python model): the requests' inputs merged into
    one buffer, their rows back to back in `requests` order. Answered with `RequestResults` or
    `WorkerFailure`."""

    requests: list[RequestInfo]
    inputs: list[TensorMeta]


class Close(msgspec.Struct, tag="close", array_like=True, kw_only=True):
    """Finalize the model and exit. Answered with `Closed`."""


class BlsAnswer(msgspec.Struct, tag="bls_answer", array_like=True, kw_only=True):
    """The server's answer to the worker's `BlsCall` (or a `WorkerFailure`)."""

    outputs: list[TensorMeta]
    parameters: dict[str, Any] | None = None


# --- worker -> server ------------------------------------------------------------------------------
class Loaded(msgspec.Struct, tag="loaded", array_like=True, kw_only=True):
    """The model is loaded."""

    #: The backend executes per request (a Triton python model): the server sends it
    #: `ExecuteRequests`.
    executes_requests: bool


class Outputs(msgspec.Struct, tag="outputs", array_like=True, kw_only=True):
    """An `Execute` batch's outputs."""

    outputs: list[TensorMeta]
    #: The model's custom metric families (CustomMetrics.snapshot()), when it defined any.
    metrics: list | None = None


class RequestResult(msgspec.Struct, array_like=True, kw_only=True):
    """One request's outcome in a per-request batch: its outputs, or that the model rescheduled
    it, or its error."""

    outputs: list[TensorMeta] = []
    #: Response parameters the model set.
    parameters: dict[str, Any] | None = None
    rescheduled: bool = False
    error: WorkerFailure | None = None


class RequestResults(msgspec.Struct, tag="results", array_like=True, kw_only=True):
    """An `ExecuteRequests` batch's outcomes, in its requests' order."""

    results: list[RequestResult]
    #: As in `Outputs`.
    metrics: list | None = None


class Closed(msgspec.Struct, tag="closed", array_like=True, kw_only=True):
    """The model is finalized; the worker exits."""


class BlsCall(msgspec.Struct, tag="bls", array_like=True, kw_only=True):
    """A BLS call the model code makes while the server waits for its answer (convoy.types.
    ModelCall's fields). Answered with `BlsAnswer` or `WorkerFailure`."""

    model: str
    version: str
    requested: tuple[str, ...]
    parameters: dict[str, Any]
    timeout_us: int
    waiter: str
    serving: tuple[int, ...]
    id: str
    inputs: list[TensorMeta]


#: What each side decodes.
ToWorker = Load | Execute | ExecuteRequests | Close | BlsAnswer | WorkerFailure
FromWorker = Loaded | Outputs | RequestResults | Closed | BlsCall | WorkerFailure
