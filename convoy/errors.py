"""Every error Convoy raises on purpose, grouped by blast radius, and how each maps onto the wire.

The core never imports a web or RPC framework: statuses are named here as plain strings (gRPC
status-code names) and integers (HTTP codes); `server/` turns them into its transports' types.
"""

from __future__ import annotations


class ConvoyError(Exception):
    """Base class; its message is safe to send to a client."""


# --- this request is bad -------------------------------------------------------------------
class InvalidInput(ConvoyError):
    """A request does not match the model's declared inputs or the protocol (name, type, shape, size)."""


class ModelNotFound(ConvoyError):
    """The named model or version is not in the repository."""


class Unauthenticated(ConvoyError):
    """The request carries no valid credentials."""


class PermissionDenied(ConvoyError):
    """The credentials are valid but do not cover this model or API."""


class Unsupported(ConvoyError):
    """The protocol feature exists but Convoy does not implement it (e.g. CUDA shared memory),
    or this server was started without it (client shared memory)."""


class AlreadyExists(ConvoyError):
    """The request would create what already exists (a shared-memory region of that name)."""


class RegionNotFound(ConvoyError):
    """A named shared-memory region is not registered."""


class NoDevice(ConvoyError):
    """The feature needs a device this server does not have (CUDA shared memory without a GPU)."""


class Conflict(ConvoyError):
    """The call conflicts with what the server is doing (a roll-out already runs on the model)."""


# --- the repository / a model's configuration is bad ------------------------------------------
class InvalidConfig(ConvoyError):
    """A model's config.pbtxt or files are invalid; the message names the file and the field."""


class ModelLoadFailed(ConvoyError):
    """A model could not be loaded or warmed up; it stays NOT READY with this reason."""


class ModelPollFailed(ConvoyError):
    """A load request could not read what it names: no such model folder, an invalid config
    (config.pbtxt or the load's `config`) or invalid file overrides (Triton: a poll failure)."""


# --- try again later --------------------------------------------------------------------------
class Overloaded(ConvoyError):
    """The model's queue is full (or the request cannot meet its deadline): rejected at once."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        #: Seconds the client should wait before retrying (HTTP Retry-After, gRPC pushback).
        self.retry_after = retry_after


class Unavailable(ConvoyError):
    """The model is not ready, or the server is shutting down."""


class DeadlineExceeded(ConvoyError):
    """The request's timeout passed before it could be served."""


class Cancelled(ConvoyError):
    """The client went away or cancelled the request."""


# --- this batch failed --------------------------------------------------------------------------
class InferenceFailed(ConvoyError):
    """The runtime raised while executing the batch this request rode in."""


class ModelReportedUnknown(InferenceFailed):
    """The model answered a request with an error of unknown kind (Triton's TritonError.UNKNOWN)."""


class ModelReportedAlreadyExists(InferenceFailed):
    """The model answered a request with TritonError.ALREADY_EXISTS."""


class InstanceLost(InferenceFailed):
    """The batch's runtime instance is unusable after it (its worker process died, its CUDA
    context is poisoned); the model restarts the instance and is unready meanwhile."""


class InstanceExited(InstanceLost):
    """Model code tried to end the server's process (os._exit, a fatal signal to itself,
    sys.exit); the call was refused and only that instance is restarted."""


# --- the engine is gone ----------------------------------------------------------------------------
class EngineDead(ConvoyError):
    """A runtime's worker died; the model is being restarted and is unavailable meanwhile."""


#: class -> (gRPC status-code name, HTTP status). Looked up along the MRO; anything else is INTERNAL/500.
STATUS: dict[type[ConvoyError], tuple[str, int]] = {
    InvalidInput: ("INVALID_ARGUMENT", 400),
    ModelNotFound: ("NOT_FOUND", 404),
    Unauthenticated: ("UNAUTHENTICATED", 401),
    PermissionDenied: ("PERMISSION_DENIED", 403),
    Unsupported: ("UNIMPLEMENTED", 501),
    AlreadyExists: ("ALREADY_EXISTS", 400),
    RegionNotFound: ("NOT_FOUND", 404),
    NoDevice: ("UNAVAILABLE", 400),
    Conflict: ("FAILED_PRECONDITION", 409),
    InvalidConfig: ("INVALID_ARGUMENT", 400),
    # Triton's statuses for load failures, which its clients check: a model that fails to load
    # is INVALID_ARG, a load whose repository read (poll) fails is INTERNAL.
    ModelLoadFailed: ("INVALID_ARGUMENT", 400),
    ModelPollFailed: ("INTERNAL", 500),
    Overloaded: ("RESOURCE_EXHAUSTED", 429),
    Unavailable: ("UNAVAILABLE", 503),
    DeadlineExceeded: ("DEADLINE_EXCEEDED", 504),
    Cancelled: ("CANCELLED", 499),
    InferenceFailed: ("INTERNAL", 500),
    # Triton answers these two codes with 400 over HTTP ("no direct matching code").
    ModelReportedUnknown: ("UNKNOWN", 400),
    ModelReportedAlreadyExists: ("ALREADY_EXISTS", 400),
    EngineDead: ("UNAVAILABLE", 503),
}

INTERNAL_MESSAGE = "internal error (details are in the server log)"


def status_of(exc: BaseException) -> tuple[str, int, str]:
    """(gRPC status name, HTTP status, client-safe message) for any exception."""
    if isinstance(exc, ConvoyError):
        for cls in type(exc).__mro__:
            found = STATUS.get(cls)
            if found is not None:
                return found[0], found[1], str(exc)
    return "INTERNAL", 500, INTERNAL_MESSAGE
