"""How a load-test request can fail; each becomes a locust failure event and one counter.

Grouped like Convoy's own errors: the server said "try again later" (`Rejected`), the request
failed (`RequestFailed`), or the server answered wrongly (`ResponseMismatch`, never ignored).
"""

from __future__ import annotations


class LoadTestFailure(Exception):
    """Base class: a request that counts as a failure in the step's statistics."""

    kind = "error"


class Rejected(LoadTestFailure):
    """The server shed the request: HTTP 429 or gRPC RESOURCE_EXHAUSTED (its queue is full)."""

    kind = "rejected"


class RequestFailed(LoadTestFailure):
    """Any other error: a status the server returned, a timeout, a broken connection."""

    kind = "error"


class ResponseMismatch(LoadTestFailure):
    """The server answered, but not this request: wrong id, outputs, shapes or values."""

    kind = "mismatch"


#: Status strings tritonclient reports for load shedding (HTTP code; gRPC code name).
REJECTION_STATUSES = frozenset({"429", "StatusCode.RESOURCE_EXHAUSTED"})

#: A streamed error carries only its message; these phrases mark load shedding (Convoy, Triton).
REJECTION_PHRASES = ("queue is full", "exceeds maximum queue size", "resource_exhausted")


def from_client_error(status: str | None, message: str) -> LoadTestFailure:
    """Turn a tritonclient InferenceServerException's status and message into a failure."""
    if status in REJECTION_STATUSES or (
        status is None and any(p in message.lower() for p in REJECTION_PHRASES)
    ):
        return Rejected(f"{status or 'stream'}: {message}")
    return RequestFailed(f"{status or 'error'}: {message}")


def failure_kind(exception: BaseException | None) -> str:
    """'ok', 'rejected', 'mismatch' or 'error' for a locust request event's exception."""
    if exception is None:
        return "ok"
    return getattr(exception, "kind", "error")
