"""Types of convoy.server._native, the native front end built from server/native/py/src/lib.rs.

The extension has no Python source, so this stub is what the type checker reads; it is written by
hand and changes with lib.rs (its #[pyclass], #[pymethods] and #[pyfunction] items and the tuples
that `item_to_python` and `answer_from_python` build and read).
"""

from typing import Any, Final, Literal, NotRequired, TypeAlias, TypedDict, final

# --- what take() returns: one tuple per pending item, its kind first ---------------------------
#: A tensor of an inference call: (name, datatype, shape, its bytes, not copied).
InTensor: TypeAlias = tuple[str, str, tuple[int, ...], WireBytes]
#: Request parameters as the client sent them.
Parameters: TypeAlias = dict[str, bool | int | float | str]
#: (0, slot, protocol "grpc" | "grpc-stream" | "http", model, version, id, token, rows, inputs,
#: requested outputs (empty: all), parameters, received_ns, deadline_ns, authorization,
#: traceparent, split_key); times are monotonic nanoseconds, as time.monotonic_ns().
InferItem: TypeAlias = tuple[
    Literal[0],
    int,
    str,
    str,
    str,
    str,
    int,
    int,
    list[InTensor],
    tuple[str, ...],
    Parameters,
    int,
    int | None,
    str | None,
    str | None,
    str | None,
]
#: (1, slot, method, raw path, query, [(lower-case name, value)], body, client (host, port) or
#: None, server (host, port), scheme "http" | "https").
HttpItem: TypeAlias = tuple[
    Literal[1],
    int,
    str,
    bytes,
    bytes,
    list[tuple[bytes, bytes]],
    bytes,
    tuple[str, int] | None,
    tuple[str, int],
    str,
]
#: (2, slot, method, [(key, value)] ASCII metadata, message, received_ns, deadline_ns).
GrpcItem: TypeAlias = tuple[Literal[2], int, str, list[tuple[str, str]], bytes, int, int | None]
#: (3, slot): the client went away before its answer.
CancelItem: TypeAlias = tuple[Literal[3], int]
#: (4, level name, message): a line for the Python log.
LogItem: TypeAlias = tuple[Literal[4], str, str]
#: Every item kind. take() is typed with plain tuples so that code switching on item[0] can
#: unpack them; cast to one of these where the kind is known.
Item: TypeAlias = InferItem | HttpItem | GrpcItem | CancelItem | LogItem

# --- what answer() takes: (slot, kind, ...) ---------------------------------------------------
#: An output tensor: (name, datatype, shape, data: bytes or any C-contiguous buffer).
OutTensor: TypeAlias = tuple[str, str, list[int], Any]
#: Kind 0 (outputs), 1 (failure), 2 (a gRPC message), 3 (a stream is finished), 4 (an HTTP head)
#: and 5 (an HTTP body chunk); see `answer_from_python` in lib.rs.
OutputsAnswer: TypeAlias = tuple[int, Literal[0], str, list[OutTensor], Parameters | None]
FailureAnswer: TypeAlias = tuple[int, Literal[1], int, int, str, int | None, bool]
MessageAnswer: TypeAlias = tuple[int, Literal[2], Any]
FinishedAnswer: TypeAlias = tuple[int, Literal[3]]
HttpHeadAnswer: TypeAlias = tuple[int, Literal[4], int, list[tuple[bytes, bytes]], Any, bool]
HttpBodyAnswer: TypeAlias = tuple[int, Literal[5], Any, bool]
Answer: TypeAlias = (
    OutputsAnswer | FailureAnswer | MessageAnswer | FinishedAnswer | HttpHeadAnswer | HttpBodyAnswer
)

#: One model as set_models() takes it: (name, token, max_batch_size, native, [(input, datatype,
#: dims, optional)], [output names], body_limit, json_limit, reason, roll-out split header or "").
ModelRow: TypeAlias = tuple[
    str, int, int, bool, list[tuple[str, str, list[int], bool]], list[str], int, int, str, str
]

class FrontendSettings(TypedDict):
    """The settings dict Frontend() reads (durations in seconds); a missing key or a value of
    the wrong type raises ValueError."""

    host: str
    http_port: int
    grpc_port: int
    reuse_port: bool
    max_connections: int
    header_timeout: float
    keep_alive_timeout: float
    max_head_bytes: int
    max_headers: int
    http_max_body_bytes: int
    grpc_max_message_bytes: int
    threads: int
    # TLS when both cert and key are given; client_ca asks clients for certificates (mTLS).
    tls_cert: NotRequired[str | None]
    tls_key: NotRequired[str | None]
    tls_client_ca: NotRequired[str | None]

@final
class WireBytes:
    """Received bytes lent to Python without a copy, read-only (numpy views them in place); only
    the native side makes them (it defines no constructor)."""

    def __len__(self) -> int: ...
    def __bytes__(self) -> bytes: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

@final
class Frontend:
    """Both ports bound and served on the native side's own threads."""

    @property
    def http_port(self) -> int: ...
    @property
    def grpc_port(self) -> int: ...
    def __init__(self, settings: FrontendSettings) -> None: ...
    def fileno(self) -> int:
        """The eventfd that is readable while items wait."""

    def take(self) -> list[tuple[Any, ...]]:
        """Every pending item, each one of the `Item` shapes above."""

    def answer(self, answers: list[tuple[Any, ...]]) -> None:
        """A loop turn's answers, each one of the `Answer` shapes above."""

    def set_models(self, models: list[ModelRow]) -> None: ...
    def set_accepting(self, accepting: bool) -> None: ...
    def filter_new_connections(self) -> list[str]: ...
    def close_listeners(self) -> None: ...
    def shutdown_connections(self) -> None: ...
    def status(self) -> tuple[int, int, int]:
        """(open HTTP connections, open gRPC connections, slots awaiting an answer)."""

    def stop(self) -> None: ...

def error_table() -> list[tuple[str, str, int]]:
    """(error class name, gRPC status name, HTTP status) for the errors the native side raises."""

#: How many messages of one ModelStreamInfer stream are read but not yet answered, at most.
STREAM_BACKLOG: Final[int]
