"""The server log: text or JSON lines, and Triton's log settings mapped onto Python logging.

`configure_logging` runs once in the CLI and returns the `LogControl` that the LogSettings API
(gRPC `LogSettings`, HTTP `/v2/logging`) reads and changes while the server runs. A record that
carries `request_id` (passed with `extra=`) shows it; tracebacks stay in the log, never on the wire.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO

import orjson

from convoy.errors import InvalidInput, Unsupported

#: `log_format` values: Convoy's two, and Triton's (both text here; ISO8601 stamps the time so).
LOG_FORMATS = ("text", "json", "default", "ISO8601")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _iso_time(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message (request id)`."""

    def __init__(self, iso_time: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._iso_time = iso_time

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso_time(record.created) if self._iso_time else super().formatTime(record, datefmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} (request {request_id})" if request_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, request_id when known,
    structured `fields` when the record has them, and the traceback of an error."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["traceback"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    return TextFormatter(iso_time=log_format == "ISO8601")


class _LevelFilter(logging.Filter):
    """Drops the levels Triton's settings switched off (they are independent switches)."""

    def __init__(self) -> None:
        super().__init__()
        self.disabled: frozenset[int] = frozenset()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno not in self.disabled


class LogControl:
    """Triton's log settings (log_info, log_warning, log_error, log_verbose_level, log_format,
    log_file) applied to a logger (the root by default) and the handlers it writes through."""

    def __init__(
        self,
        level: str = "INFO",
        log_format: str = "text",
        handlers: tuple[logging.Handler, ...] = (),
        logger: logging.Logger | None = None,
    ) -> None:
        if level not in LOG_LEVELS:
            raise InvalidInput(f"log level must be one of {', '.join(LOG_LEVELS)}, got '{level}'")
        if log_format not in LOG_FORMATS:
            raise InvalidInput(f"log format must be one of {', '.join(LOG_FORMATS)}, got '{log_format}'")
        self._logger = logger or logging.getLogger()
        self._handlers = list(handlers)
        #: Handlers that follow log_format but not the level switches (the access log's).
        self._format_only: list[logging.Handler] = []
        self._filter = _LevelFilter()
        for handler in handlers:
            handler.addFilter(self._filter)
        threshold = logging.getLevelName(level)
        self._settings: dict[str, object] = {
            "log_file": "",
            "log_info": threshold <= logging.INFO,
            "log_warning": threshold <= logging.WARNING,
            "log_error": threshold <= logging.ERROR,
            "log_verbose_level": 1 if threshold <= logging.DEBUG else 0,
            "log_format": log_format,
        }
        self._apply()

    def follow_format(self, handler: logging.Handler) -> None:
        """Keep `handler` in the current log_format, whatever the level settings say."""
        self._format_only.append(handler)
        handler.setFormatter(make_formatter(str(self._settings["log_format"])))

    def settings(self) -> dict[str, object]:
        """The current settings, in the shape Triton's LogSettings answers."""
        return dict(self._settings)

    def update(self, changes: dict[str, object]) -> dict[str, object]:
        """Apply the settings given (None leaves one as it is); all or nothing."""
        checked = {}
        for key, value in changes.items():
            if value is None:
                continue
            if key in ("log_info", "log_warning", "log_error"):
                if not isinstance(value, bool):
                    raise InvalidInput(f"expect boolean for '{key}', got {value!r}")
            elif key == "log_verbose_level":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise InvalidInput(
                        f"expect int32 for '{key}' (a non-negative integer), got {value!r}"
                    )
            elif key == "log_format":
                if value not in LOG_FORMATS:
                    raise InvalidInput(
                        f"invalid argument for log_format, got: {value} (expected one of "
                        f"{', '.join(LOG_FORMATS)})"
                    )
            elif key == "log_file":
                if value != "":  # Triton's words; "" (where Convoy logs: standard error) is a no-op
                    raise Unsupported("log file location can not be updated through network protocol")
            else:
                raise InvalidInput(
                    f"unknown log setting '{key}'; expected one of {', '.join(self._settings)}"
                )
            checked[key] = value
        self._settings.update(checked)
        self._apply()
        return self.settings()

    def _apply(self) -> None:
        s = self._settings
        verbose = s["log_verbose_level"]
        assert isinstance(verbose, int)  # set so in __init__; update() takes only an int
        enabled = {
            logging.DEBUG: verbose > 0,
            logging.INFO: s["log_info"],
            logging.WARNING: s["log_warning"],
            logging.ERROR: s["log_error"],
            logging.CRITICAL: s["log_error"],
        }
        on = [level for level, wanted in enabled.items() if wanted]
        self._logger.setLevel(min(on) if on else logging.CRITICAL + 1)
        self._filter.disabled = frozenset(level for level, wanted in enabled.items() if not wanted)
        formatter = make_formatter(str(s["log_format"]))
        for handler in (*self._handlers, *self._format_only):
            handler.setFormatter(formatter)


def configure_logging(
    level: str = "INFO", log_format: str = "text", stream: IO[str] | None = None
) -> LogControl:
    """Send the process's log to `stream` (stderr) in `log_format`; the CLI calls this once."""
    handler = logging.StreamHandler(stream or sys.stderr)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    return LogControl(level, log_format, handlers=(handler,), logger=root)
