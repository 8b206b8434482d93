"""Triton's TritonError (an error a response carries), TritonModelException, and how they map
onto Convoy's errors."""

from __future__ import annotations

from convoy.errors import (
    Cancelled,
    ConvoyError,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    Unavailable,
    Unsupported,
)


# --- errors -----------------------------------------------------------------------------------------
class TritonError:
    """An error a model reports in a response (not raised)."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = str(message)
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class TritonModelException(Exception):
    """Raised by this module's calls (Triton raises it for misuse of its API)."""

    def message(self) -> str:
        return str(self)


_ERROR_CODES: tuple[tuple[type[ConvoyError], int], ...] = (
    (InvalidInput, TritonError.INVALID_ARG),
    (ModelNotFound, TritonError.NOT_FOUND),
    (Unavailable, TritonError.UNAVAILABLE),
    (Unsupported, TritonError.UNSUPPORTED),
    (Cancelled, TritonError.CANCELLED),
    (DeadlineExceeded, TritonError.UNAVAILABLE),
)


def error_of(exc: BaseException) -> TritonError:
    """The TritonError a BLS response carries for a Convoy error."""
    for cls, code in _ERROR_CODES:
        if isinstance(exc, cls):
            return TritonError(str(exc), code)
    return TritonError(str(exc), TritonError.INTERNAL)


def convoy_error(error: TritonError, model: str) -> ConvoyError:
    """The Convoy error a client gets for a response's TritonError (status by its code)."""
    message = error.message()
    for cls, code in _ERROR_CODES:
        if code == error.code() and cls is not DeadlineExceeded:
            return cls(message)
    from convoy.errors import InferenceFailed

    return InferenceFailed(message or f"model '{model}' reported an error")
