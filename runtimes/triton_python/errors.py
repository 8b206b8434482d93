"""Triton's TritonError (an error a response carries), TritonModelException, and how they map
onto Convoy's errors."""

from __future__ import annotations

from convoy.errors import (
    AlreadyExists,
    Cancelled,
    ConvoyError,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ModelReportedAlreadyExists,
    ModelReportedUnknown,
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


#: Convoy error class <-> TritonError code, the way Triton's front ends map its codes to statuses
#: (UNKNOWN -> gRPC UNKNOWN, ALREADY_EXISTS -> ALREADY_EXISTS, ...). The first class listed for
#: a code is the one a model's TritonError becomes; the others only map Convoy errors to codes.
_ERROR_CODES: tuple[tuple[type[ConvoyError], int], ...] = (
    (InvalidInput, TritonError.INVALID_ARG),
    (ModelNotFound, TritonError.NOT_FOUND),
    (Unavailable, TritonError.UNAVAILABLE),
    (Unsupported, TritonError.UNSUPPORTED),
    (Cancelled, TritonError.CANCELLED),
    (ModelReportedUnknown, TritonError.UNKNOWN),
    (ModelReportedAlreadyExists, TritonError.ALREADY_EXISTS),
    (AlreadyExists, TritonError.ALREADY_EXISTS),
    (DeadlineExceeded, TritonError.UNAVAILABLE),
)


def error_of(exc: BaseException) -> TritonError:
    """The TritonError a BLS response carries for a Convoy error."""
    return TritonError(str(exc), code_of(exc))


def code_of(exc: BaseException) -> int:
    """The TritonError code for a Convoy error (INTERNAL for anything else)."""
    for cls, code in _ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return TritonError.INTERNAL


def error_class(code: int) -> type[ConvoyError]:
    """The Convoy error class a TritonError code becomes (InferenceFailed for INTERNAL and
    codes Triton does not define)."""
    for cls, known in _ERROR_CODES:
        if known == code:
            return cls
    return InferenceFailed


def convoy_error(error: TritonError, model: str) -> ConvoyError:
    """The Convoy error a client gets for a response's TritonError (status by its code)."""
    return error_class(error.code())(error.message() or f"model '{model}' reported an error")
