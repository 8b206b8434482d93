"""Payload logging (`--payload-log-dir`): sampled requests with their inputs and outputs, as JSON lines,
for drift monitoring and retraining.

A model opts in with the config.pbtxt parameter `payload_log_sample_rate` (0..1). Sampling is
count-based, so it is deterministic: of a model's first n requests exactly floor(n * rate) are
logged (rate 0.25 logs every fourth). The request path only decides whether to sample and, if
so, hooks the request's future; the outcome's references go on a bounded queue (full: dropped
and counted, never waited for), and this log's own thread serialises them with orjson and writes
`<dir>/<model>.jsonl`, rotated by size (logging.handlers.RotatingFileHandler).

One line per sampled request:
    {"timestamp": "2026-11-25T14:40:00.123456+00:00", "model": "add_sub", "version": "1",
     "id": "...", "status": "success" | "error" | "cancelled", "error": "... (errors only)",
     "latency_us": receipt to outcome, "queue_us": ..., "compute_us": ... (null without a batch),
     "inputs": [tensor, ...], "outputs": [tensor, ...] (empty on error)}
    tensor: {"name", "datatype", "shape", "data": flat row-major list}
- BYTES: "data" holds UTF-8 strings when every element decodes, else "data_base64" holds them
  base64-encoded. BF16 is written as float32 values; NaN and infinities become null (JSON).
- A tensor over `max_elements` elements keeps its first `max_elements` in "data" and gains
  "truncated": true and "elements": the full count (0 disables truncation).

A roll-out's disagreeing pairs (engine/rollout) go to `<dir>/<model>.rollout.jsonl`, whether or
not the model samples its requests, one line per sampled pair:
    {"timestamp", "model", "kind": "rollout_disagreement", "stable_version", "candidate_version",
     "id", "comparison": {"agrees": false, "outputs": {name: {kind, agrees, max_abs, ...}}},
     "inputs": [tensor, ...], "stable_outputs": [tensor, ...], "candidate_outputs": [tensor, ...]}
"""

from __future__ import annotations

import base64
import logging
import logging.handlers
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from convoy.config import ModelConfig
from convoy.datatypes import bf16_bits_to_float32, declared_datatype
from convoy.engine.repository import ModelVersion
from convoy.errors import status_of
from convoy.types import Request, Response, TensorSpec

log = logging.getLogger("convoy.payload_log")

_STOP = object()


class _Outcome(Protocol):
    """A sampled request's future, done: what the writer reads of it."""

    def cancelled(self) -> bool: ...
    def exception(self) -> BaseException | None: ...
    def result(self) -> Response: ...


class _Pair:
    """A roll-out's disagreeing pair on its way to the writer (references only)."""

    __slots__ = (
        "candidate",
        "candidate_outputs",
        "comparison",
        "config",
        "inputs",
        "request_id",
        "stable",
        "stable_outputs",
        "wall",
    )

    def __init__(
        self,
        wall: float,
        config: ModelConfig,
        stable: int,
        candidate: int,
        request_id: str,
        inputs: dict[str, np.ndarray],
        stable_outputs: dict[str, np.ndarray],
        candidate_outputs: dict[str, np.ndarray],
        comparison: dict[str, Any],
    ) -> None:
        self.wall = wall
        self.config = config
        self.stable = stable
        self.candidate = candidate
        self.request_id = request_id
        self.inputs = inputs
        self.stable_outputs = stable_outputs
        self.candidate_outputs = candidate_outputs
        self.comparison = comparison


#: Most lines, and bytes, the writer takes off the queue and writes at once.
_RUN_LINES = 512
_RUN_BYTES = 1 << 20
#: The per-model config.pbtxt parameter that turns payload logging on.
SAMPLE_RATE_PARAMETER = "payload_log_sample_rate"


class PayloadLog:
    """Sampled request/response pairs of opted-in models, written on this log's own thread.

    `start` and `close` bound the thread; `offer` is the request path's only entry (loop thread).
    `written` and `dropped` count lines per model for the Prometheus counters."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int = 100 * 1024 * 1024,
        backups: int = 5,
        max_elements: int = 65536,
        queue_size: int = 1024,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.backups = backups
        self.max_elements = max_elements
        self.queue_size = queue_size
        directory.mkdir(parents=True, exist_ok=True)
        #: Outcome tuples (see `offer`), _Pairs and _STOP.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._handlers: dict[str, logging.handlers.RotatingFileHandler] = {}
        #: Requests seen per model, for count-based sampling (loop thread only).
        self._seen: dict[str, int] = {}
        #: Lines per model: dropped on a full queue (loop thread), written (writer thread).
        self.dropped: dict[str, int] = {}
        self.written: dict[str, int] = {}
        #: The same for roll-out disagreements, per model.
        self.pairs_dropped: dict[str, int] = {}
        self.pairs_written: dict[str, int] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write_lines, name="convoy-payload-log", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread and close the files."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("payload log writer did not finish within %.0f s", timeout)
            self._thread = None
        for handler in self._handlers.values():
            handler.close()

    # --- request path (loop thread) -------------------------------------------------------------
    def offer(self, entry: ModelVersion, request: Request) -> None:
        """Sample this request (count-based) and, if chosen, log its outcome when it comes."""
        config = entry.config
        rate = config.payload_log_sample_rate
        if not rate:
            return
        model = config.name
        seen = self._seen.get(model, 0) + 1
        self._seen[model] = seen
        if int(seen * rate) == int((seen - 1) * rate):
            return
        future = request.future
        # The inputs as they are now: a --workers front end reuses the shared memory of large
        # inputs once the request is answered, before the writer thread reads them.
        inputs = {name: np.array(array) for name, array in request.inputs.items()}

        def done(_future: object) -> None:
            if self._queue.qsize() >= self.queue_size:
                self.dropped[model] = self.dropped.get(model, 0) + 1
                return
            # References only: the writer thread reads the arrays and the outcome.
            self._queue.put(
                (time.time(), time.monotonic_ns(), config, entry.version, request, inputs, future)
            )

        # A request's future on the loop (asyncio's or a DirectOutcome): both have it.
        future.add_done_callback(done)  # type: ignore[attr-defined]

    def offer_pair(
        self,
        config: ModelConfig,
        stable: int,
        candidate: int,
        request_id: str,
        inputs: dict[str, np.ndarray],
        stable_outputs: dict[str, np.ndarray],
        candidate_outputs: dict[str, np.ndarray],
        comparison: dict[str, Any],
    ) -> None:
        """A roll-out's disagreeing pair (the roll-out sampled it); dropped and counted when the
        queue is full. `inputs` are the mirror's own copies, so nothing else reuses them."""
        model = config.name
        if self._queue.qsize() >= self.queue_size:
            self.pairs_dropped[model] = self.pairs_dropped.get(model, 0) + 1
            return
        self._queue.put(
            _Pair(
                time.time(),
                config,
                stable,
                candidate,
                request_id,
                inputs,
                stable_outputs,
                candidate_outputs,
                comparison,
            )
        )

    # --- writer thread ------------------------------------------------------------------------
    def _write_lines(self) -> None:
        """Drain the queue in runs: one write (and one rotation check) per run of lines, which
        costs a fraction of a write per line."""
        stopping = False
        while not stopping:
            run = [self._queue.get()]
            while len(run) < _RUN_LINES:
                try:
                    run.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            lines: dict[tuple[str, bool], list[bytes]] = {}
            for item in run:
                if item is _STOP:
                    stopping = True
                    continue
                pair = type(item) is _Pair
                model = item.config.name if pair else item[2].name
                try:
                    record = self._pair_record(item) if pair else self._record(*item)
                    line = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
                except Exception:
                    log.exception("payload log: could not serialise a request of model '%s'", model)
                    continue
                lines.setdefault((model, pair), []).append(line)
            for (model, pair), model_lines in lines.items():
                if pair:
                    self._write(f"{model}.rollout", model_lines, self.pairs_written, model)
                else:
                    self._write(model, model_lines)

    def _write(
        self, stem: str, lines: list[bytes], counts: dict[str, int] | None = None, model: str = ""
    ) -> None:
        """Append `lines` to `<stem>.jsonl`, counting them in `counts[model]` (default: the
        model's written requests)."""
        counts = self.written if counts is None else counts
        model = model or stem
        handler = self._handler(stem)
        # Pieces no larger than a file may grow, so rotating before a piece keeps files in bounds.
        limit = min(self.max_bytes - 1, _RUN_BYTES) if self.max_bytes > 1 else _RUN_BYTES
        piece: list[bytes] = []
        size = 0
        for line in [*lines, None]:
            if piece and (line is None or size + len(line) + 1 > limit):
                record = logging.makeLogRecord({"msg": b"\n".join(piece).decode("utf-8")})
                handler.emit(record)  # reports a failed write (full disk) through handleError
                counts[model] = counts.get(model, 0) + len(piece)
                piece, size = [], 0
            if line is not None:
                piece.append(line)
                size += len(line) + 1

    def _handler(self, model: str) -> logging.handlers.RotatingFileHandler:
        handler = self._handlers.get(model)
        if handler is None:
            handler = logging.handlers.RotatingFileHandler(
                self.directory / f"{model}.jsonl",
                maxBytes=self.max_bytes,
                backupCount=self.backups,
                encoding="utf-8",
                delay=True,
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._handlers[model] = handler
        return handler

    def _record(
        self,
        wall: float,
        done_ns: int,
        config: ModelConfig,
        version: int,
        request: Request,
        inputs: dict[str, np.ndarray],
        future: _Outcome,
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(wall, UTC).isoformat(),
            "model": config.name,
            "version": str(version),
            "id": request.id,
            "status": "success",
            "latency_us": (done_ns - request.received_ns) // 1000 if request.received_ns else None,
            "queue_us": None,
            "compute_us": None,
            "inputs": [
                self._tensor(name, declared_datatype(config.input(name), array), array)
                for name, array in inputs.items()
            ],
            "outputs": [],
        }
        if future.cancelled():
            record["status"], record["error"] = "cancelled", "the request was cancelled"
            return record
        error = future.exception()
        if error is not None:
            _, _, message = status_of(error)
            record["status"], record["error"] = "error", message
            return record
        response = future.result()
        timings = response.timings
        if timings is not None:
            record["queue_us"] = max(timings.dispatched_ns - request.queued_ns, 0) // 1000
            record["compute_us"] = (timings.done_ns - timings.compute_start_ns) // 1000
        record["outputs"] = [
            self._tensor(name, declared_datatype(config.output(name), array), array)
            for name, array in response.outputs.items()
        ]
        return record

    def _pair_record(self, pair: _Pair) -> dict[str, Any]:
        config = pair.config

        def tensors(
            arrays: dict[str, np.ndarray], spec_of: Callable[[str], TensorSpec | None]
        ) -> list[dict[str, Any]]:
            return [
                self._tensor(name, declared_datatype(spec_of(name), array), array)
                for name, array in arrays.items()
            ]

        return {
            "timestamp": datetime.fromtimestamp(pair.wall, UTC).isoformat(),
            "model": config.name,
            "kind": "rollout_disagreement",
            "stable_version": str(pair.stable),
            "candidate_version": str(pair.candidate),
            "id": pair.request_id,
            "comparison": pair.comparison,
            "inputs": tensors(pair.inputs, config.input),
            "stable_outputs": tensors(pair.stable_outputs, config.output),
            "candidate_outputs": tensors(pair.candidate_outputs, config.output),
        }

    def _tensor(self, name: str, datatype: str, array: np.ndarray) -> dict[str, Any]:
        flat = array.reshape(-1)
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        total = flat.size
        if self.max_elements and total > self.max_elements:
            flat = flat[: self.max_elements]
            out["truncated"] = True
            out["elements"] = total
        if datatype == "BYTES":
            items = [v if isinstance(v, (bytes, bytearray)) else str(v).encode() for v in flat]
            try:
                out["data"] = [bytes(v).decode("utf-8") for v in items]
            except UnicodeDecodeError:
                out["data_base64"] = [base64.b64encode(v).decode("ascii") for v in items]
        elif datatype == "BF16":
            out["data"] = bf16_bits_to_float32(flat)
        else:
            out["data"] = np.ascontiguousarray(flat)
        return out
