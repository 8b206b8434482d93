"""Triton's trace settings (the trace extension: GET/POST /v2[/models/{m}]/trace/setting, gRPC
TraceSetting) and the per-request sampling decision they make.

Settings live at three levels, as in Triton: the defaults the server started with (flags), the
global settings the API changed, and per-model settings; a value left unset (or cleared with
null / an empty value list) falls back to the level above. Each level in use samples on its own:
`trace_rate` N traces one request in N, `trace_count` counts down the traces it may still start
(-1: no limit) and starts again from its value whenever that level's settings change. A request
that carries the client's trace context (W3C traceparent) is traced whenever tracing is on, as
Triton's OpenTelemetry mode does. Convoy's traces are OpenTelemetry spans (server/observability/
tracing.py), so `trace_mode` is always "opentelemetry".

One TraceControl per process that decides (the engine's; each --workers front end applies the
engine's changes to its own copy, so a trace_count is counted per front end).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from convoy.errors import InvalidInput, Unsupported

MODE = "opentelemetry"
LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
#: The settings a request may change (trace_file, trace_mode: read only).
SETTINGS = ("trace_level", "trace_rate", "trace_count", "log_frequency")
UINT32_MAX = (1 << 32) - 1
INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True, slots=True)
class TraceValues:
    """One level's values; None: not set at this level (the level above decides)."""

    level: tuple[str, ...] | None = None
    rate: int | None = None
    count: int | None = None
    log_frequency: int | None = None

    def over(self, fallback: TraceValues) -> TraceValues:
        return TraceValues(
            self.level if self.level is not None else fallback.level,
            self.rate if self.rate is not None else fallback.rate,
            self.count if self.count is not None else fallback.count,
            self.log_frequency if self.log_frequency is not None else fallback.log_frequency,
        )

    @property
    def empty(self) -> bool:
        return self == TraceValues()


@dataclass(slots=True)
class _Sampler:
    """The sampling state of one level in use: requests seen, traces it may still start."""

    values: TraceValues
    seen: int = 0
    remaining: int | None = -1

    def __post_init__(self) -> None:
        self.remaining = self.values.count

    def sample(self, has_parent: bool) -> bool:
        if self.values.level == ("OFF",):
            return False
        if has_parent:
            return True  # the client asked for this trace (its context is propagated)
        rate = self.values.rate
        if rate == 0 or self.remaining == 0:
            return False  # rate 0: only requests that carry a trace context
        self.seen += 1
        # A sampler's values are in force (over the defaults, which set every field).
        assert rate is not None
        if self.seen % rate:
            return False
        assert self.remaining is not None  # as `rate`
        if self.remaining > 0:
            self.remaining -= 1
        return True


@dataclass(frozen=True, slots=True)
class TraceDefaults:
    """What the server started with: the values, and what the response reports beside them."""

    values: TraceValues = TraceValues(("OFF",), 1, -1, 0)
    #: Whether spans have somewhere to go (an OTLP endpoint or the console).
    exporting: bool = False
    #: Reported with the settings (url, bsp_* settings, resource), as Triton's config map.
    exporter_settings: dict[str, str] = field(default_factory=dict)


class TraceControl:
    """Trace settings and sampling; the API's reads and writes (loop thread) and the front
    ends' sampling (their loop) go through one lock."""

    def __init__(self, defaults: TraceDefaults | None = None) -> None:
        self.defaults = defaults or TraceDefaults()
        self._global = TraceValues()
        self._models: dict[str, TraceValues] = {}
        self._lock = threading.Lock()
        self._samplers: dict[str, _Sampler] = {}
        self._global_sampler = _Sampler(self.defaults.values)

    # --- the API -------------------------------------------------------------------------------
    def settings(self, model: str = "") -> dict[str, str | list[str]]:
        """The settings in force for `model` (global for ""), as Triton's HTTP API writes them."""
        with self._lock:
            sampler = self._sampler(model)
            values = sampler.values
            assert values.level is not None  # values in force (over the defaults)
            answer: dict[str, str | list[str]] = {
                "trace_level": list(values.level),
                "trace_rate": str(values.rate),
                "trace_count": str(sampler.remaining),
                "trace_mode": MODE,
            }
        answer.update(self.defaults.exporter_settings)
        return answer

    def update(self, model: str, changes: dict[str, object]) -> dict[str, str | list[str]]:
        """Apply `changes` (setting -> value; None clears it) to `model` ("" global), all or
        nothing; returns the settings in force after them."""
        parsed = parse_changes(changes)
        with self._lock:
            if model:
                current = self._models.get(model, TraceValues())
                updated = _apply(current, parsed)
                self._check_exporting(updated.over(self._global).over(self.defaults.values))
                if updated.empty:
                    self._models.pop(model, None)
                    self._samplers.pop(model, None)
                else:
                    self._models[model] = updated
                    self._samplers[model] = _Sampler(self._effective(model))
            else:
                updated = _apply(self._global, parsed)
                self._check_exporting(updated.over(self.defaults.values))
                self._global = updated
                self._global_sampler = _Sampler(self._effective(""))
                # Models with settings of their own follow the global values they left unset.
                for name in self._models:
                    self._samplers[name] = _Sampler(self._effective(name))
        return self.settings(model)

    # --- between processes -----------------------------------------------------------------------
    def state(self) -> dict[str, dict[str, Any]]:
        """Every level's own values ("" is global), to hand to another process's copy."""
        with self._lock:
            levels = {"": self._global, **self._models}
            return {name: _as_dict(values) for name, values in levels.items()}

    def restore(self, state: dict[str, dict[str, Any]]) -> None:
        """Take another process's `state` (its samplers start afresh)."""
        with self._lock:
            self._global = _from_dict(state.get("", {}))
            self._models = {k: _from_dict(v) for k, v in state.items() if k}
            self._global_sampler = _Sampler(self._effective(""))
            self._samplers = {name: _Sampler(self._effective(name)) for name in self._models}

    # --- per request -------------------------------------------------------------------------------
    def sample(self, model: str, has_parent: bool = False) -> bool:
        """Whether this request of `model` is traced (counts it against rate and count)."""
        with self._lock:
            return self._sampler(model).sample(has_parent)

    def _sampler(self, model: str) -> _Sampler:
        return self._samplers.get(model, self._global_sampler) if model else self._global_sampler

    def _effective(self, model: str) -> TraceValues:
        values = self._global.over(self.defaults.values)
        if model:
            values = self._models.get(model, TraceValues()).over(values)
        return values

    def _check_exporting(self, values: TraceValues) -> None:
        if values.level != ("OFF",) and not self.defaults.exporting:
            raise InvalidInput(
                "trace setting 'trace_level': this server has nowhere to send traces; start it "
                "with --trace-otlp-endpoint URL, --trace-console or --trace-config "
                "mode=opentelemetry"
            )


def _as_dict(values: TraceValues) -> dict[str, Any]:
    return {
        "level": None if values.level is None else list(values.level),
        "rate": values.rate,
        "count": values.count,
        "log_frequency": values.log_frequency,
    }


def _from_dict(document: dict[str, Any]) -> TraceValues:
    level = document.get("level")
    return TraceValues(
        None if level is None else tuple(level),
        document.get("rate"),
        document.get("count"),
        document.get("log_frequency"),
    )


def _apply(current: TraceValues, parsed: dict[str, object]) -> TraceValues:
    fields = {"trace_level": "level", "trace_rate": "rate", "trace_count": "count"}
    fields["log_frequency"] = "log_frequency"
    # Each value has its field's type (parse_changes checked it).
    updates: dict[str, Any] = {fields[key]: value for key, value in parsed.items()}
    return replace(current, **updates)


def parse_changes(changes: dict[str, object]) -> dict[str, object]:
    """Validate API changes (values as Triton's clients send them: strings, or lists of strings
    for trace_level; None clears) in Triton's words; unknown settings are refused."""
    parsed: dict[str, object] = {}
    for key, value in changes.items():
        if key == "trace_file":
            raise Unsupported("trace file location can not be updated through network protocol")
        if key == "trace_mode":
            if value is not None and _one(key, value) != MODE:
                raise InvalidInput(
                    f"trace setting 'trace_mode': Convoy traces in '{MODE}' mode only, got {value!r}"
                )
            continue
        if key not in SETTINGS:
            raise InvalidInput(
                f"unknown trace setting '{key}'; expected one of {', '.join(SETTINGS)} "
                "(trace_file and trace_mode are read only)"
            )
        if value is None:
            parsed[key] = None
        elif key == "trace_level":
            parsed[key] = _levels(value)
        elif key == "trace_rate":
            parsed[key] = _integer(key, value, 0, UINT32_MAX)
        elif key == "trace_count":
            parsed[key] = _integer(key, value, -1, INT32_MAX)
        else:
            parsed[key] = _integer(key, value, 0, UINT32_MAX)
    return parsed


def _one(key: str, value: object) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise InvalidInput(f"trace setting '{key}': expected one value, got {value!r}")
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # Triton's clients send strings; a JSON number means the same
    if not isinstance(value, str):
        raise InvalidInput(f"trace setting '{key}': expected a string, got {value!r}")
    return value


def _levels(value: object) -> tuple[str, ...]:
    levels = [value] if isinstance(value, str) else value
    if not isinstance(levels, list) or not levels or not all(isinstance(v, str) for v in levels):
        raise InvalidInput(f"trace setting 'trace_level': expected a list of levels, got {value!r}")
    for level in levels:
        if level not in LEVELS:
            raise InvalidInput(
                f"trace setting 'trace_level': expected OFF, TIMESTAMPS or TENSORS, got {level!r}"
            )
    if "OFF" in levels:
        if len(levels) != 1:
            raise InvalidInput("Expect only one trace level 'OFF' is specified")
        return ("OFF",)
    if "TENSORS" in levels:
        raise Unsupported(
            "trace level TENSORS is not implemented: Convoy's spans carry timestamps, not tensors"
        )
    return ("TIMESTAMPS",)


def _integer(key: str, value: object, low: int, high: int) -> int:
    text = _one(key, value)
    try:
        number = int(text)
    except ValueError:
        raise InvalidInput(f"Unable to parse '{key}', got: {text}") from None
    if key == "trace_count" and number < low:
        raise InvalidInput(f"Unable to parse 'trace_count'. Expecting value >= {low}, got:{text}")
    if not low <= number <= high:
        raise InvalidInput(
            f"Unable to parse '{key}', value is out of range [ {low}, {high} ], got: {text}"
        )
    return number


# --- the server's start-up settings (--trace-otlp-endpoint, --trace-console, --trace-config) ----

#: Triton's OpenTelemetry exporter address when --trace-config gives none.
DEFAULT_OTLP_URL = "http://localhost:4318/v1/traces"
#: BatchSpanProcessor settings --trace-config opentelemetry,<name>=N sets, and their defaults
#: (OpenTelemetry's environment variables first, as in Triton).
BSP_SETTINGS = {
    "bsp_max_queue_size": ("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
    "bsp_schedule_delay": ("OTEL_BSP_SCHEDULE_DELAY", 5000),
    "bsp_max_export_batch_size": ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
}


@dataclass(frozen=True, slots=True)
class TraceSetup:
    """Everything tracing needs at start: the API's defaults and where spans go."""

    defaults: TraceDefaults
    otlp_endpoint: str = ""
    console: bool = False
    #: Resource attributes added to "service.name": "convoy" (opentelemetry,resource=k=v).
    resource: dict[str, str] = field(default_factory=dict)
    #: BatchSpanProcessor settings by Triton's names (bsp_*).
    batch: dict[str, int] = field(default_factory=dict)

    @property
    def exporting(self) -> bool:
        return bool(self.otlp_endpoint or self.console)


def trace_setup(
    otlp_endpoint: str = "",
    console: bool = False,
    configs: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> TraceSetup:
    """Read Convoy's trace flags and Triton's `--trace-config` ones (`level=`, `rate=`,
    `count=`, `mode=opentelemetry`, `opentelemetry,url=`, `opentelemetry,resource=k=v`,
    `opentelemetry,bsp_*=N`); raises ValueError naming what it cannot honour. With Convoy's
    flags every request is traced unless --trace-config says otherwise; with Triton's alone,
    tracing starts OFF unless `level=` turns it on, as Triton's does."""
    import os

    env = os.environ if env is None else env
    level: tuple[str, ...] = ("TIMESTAMPS",) if (otlp_endpoint or console) else ("OFF",)
    rate, count = 1, -1
    resource: dict[str, str] = {}
    batch = {name: int(env.get(var, default)) for name, (var, default) in BSP_SETTINGS.items()}
    url = ""
    opentelemetry = False
    for config in configs:
        mode, setting = config.split(",", 1) if "," in config.split("=", 1)[0] else ("", config)
        name, equals, value = setting.partition("=")
        if not equals or not name or not value:
            raise ValueError(f"--trace-config {config}: expected [<mode>,]<setting>=<value>")
        if mode == "":
            if name == "level":
                if value.upper() not in ("OFF", "TIMESTAMPS"):
                    raise ValueError(
                        f"--trace-config {config}: expected level OFF or TIMESTAMPS (TENSORS is "
                        "not implemented: Convoy's spans carry timestamps, not tensors)"
                    )
                level = (value.upper(),)
            elif name in ("rate", "count"):
                try:
                    number = int(value)
                except ValueError:
                    raise ValueError(f"--trace-config {config}: expected an integer") from None
                if (name == "rate" and number < 0) or (name == "count" and number < -1):
                    raise ValueError(f"--trace-config {config}: out of range")
                rate, count = (number, count) if name == "rate" else (rate, number)
            elif name == "mode":
                if value != MODE:
                    raise ValueError(
                        f"--trace-config {config}: Convoy traces in opentelemetry mode only (it "
                        "writes no Triton trace files)"
                    )
                opentelemetry = True
            else:
                raise ValueError(f"--trace-config {config}: unknown setting '{name}'")
        elif mode == MODE:
            if name == "url":
                url = value if "://" in value else f"http://{value}"
            elif name == "resource":
                key, equals, attribute = value.partition("=")
                if not equals or not key:
                    raise ValueError(f"--trace-config {config}: expected resource=<key>=<value>")
                resource[key] = attribute
            elif name in BSP_SETTINGS:
                try:
                    batch[name] = int(value)
                except ValueError:
                    raise ValueError(f"--trace-config {config}: expected an integer") from None
            else:
                raise ValueError(f"--trace-config {config}: unknown opentelemetry setting '{name}'")
        else:
            raise ValueError(
                f"--trace-config {config}: Convoy traces in opentelemetry mode only (settings "
                f"for mode '{mode}' do not apply)"
            )
    if url and otlp_endpoint and url != otlp_endpoint:
        raise ValueError("--trace-config opentelemetry,url and --trace-otlp-endpoint disagree")
    endpoint = otlp_endpoint or url or (DEFAULT_OTLP_URL if opentelemetry else "")
    reported = {"url": endpoint} if endpoint else {}
    if resource:
        reported["resource"] = ",".join(f"{k}={v}" for k, v in resource.items())
    if endpoint or console:
        reported.update({name: str(value) for name, value in batch.items()})
    defaults = TraceDefaults(TraceValues(level, rate, count, 0), bool(endpoint or console), reported)
    return TraceSetup(defaults, endpoint, console, resource, batch)
