"""triton_python_backend_utils helpers: tensor/config look-ups, get_model_dir, Logger, custom
metrics (MetricFamily / Metric) and the ModelConfig that auto_complete_config edits."""

from __future__ import annotations

import enum
import logging
import threading

from .errors import TritonModelException
from .inference import InferenceRequest, InferenceResponse, _Binding, _scope
from .tensor import Tensor


# --- helpers ------------------------------------------------------------------------------------------
def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    origin = inference_request._origin
    if origin is not None:  # a request handed to execute: look its array up by name
        array = origin.inputs.get(name)
        if array is None:
            return None
        tensor = Tensor.__new__(Tensor)
        tensor._name = name
        tensor._array = array
        return tensor
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    for item in model_config.get("input", []):
        if item.get("name") == name:
            return item
    return None


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    for item in model_config.get("output", []):
        if item.get("name") == name:
            return item
    return None


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    policy = model_config.get("model_transaction_policy") or {}
    return bool(policy.get("decoupled", False))


def get_model_dir() -> str:
    """The version folder of the model executing now (where its model.py lives)."""
    scope = _scope.get()
    directory = getattr(scope, "model_dir", None) if scope is not None else None
    if directory is None:
        directory = _model_dirs.get(threading.get_ident())
    if directory is None:
        raise TritonModelException("get_model_dir() is only available inside a model")
    return directory


#: thread id -> version folder of the model instance owning that thread.
_model_dirs: dict[int, str] = {}


# --- logging ----------------------------------------------------------------------------------------
class _LogLevel(enum.IntEnum):
    """Triton's Logger.LogLevel, valued as the Python logging levels the lines are written at
    (VERBOSE is DEBUG: shown once the log settings' log_verbose_level is above 0)."""

    INFO = logging.INFO
    WARNING = logging.WARNING
    ERROR = logging.ERROR
    VERBOSE = logging.DEBUG


class Logger:
    """Triton's model logger: lines go to the server log at their level, under the logger
    `convoy.model.<model>` (the model executing on the calling thread; `convoy.model` when
    that is not known, e.g. a thread the model started)."""

    LogLevel = _LogLevel
    # Triton exports the levels into the class too: `logger.log(message, logger.INFO)`.
    INFO = _LogLevel.INFO
    WARNING = _LogLevel.WARNING
    ERROR = _LogLevel.ERROR
    VERBOSE = _LogLevel.VERBOSE

    @staticmethod
    def log(message: str, level: _LogLevel = _LogLevel.INFO) -> None:
        if not isinstance(level, _LogLevel):
            raise TritonModelException(
                f"Logger.log: level must be one of Logger.INFO, WARNING, ERROR or VERBOSE, got {level!r}"
            )
        _logger().log(int(level), "%s", message, stacklevel=2)

    @staticmethod
    def log_info(message: str) -> None:
        _logger().info("%s", message, stacklevel=2)

    @staticmethod
    def log_warn(message: str) -> None:
        _logger().warning("%s", message, stacklevel=2)

    @staticmethod
    def log_error(message: str) -> None:
        _logger().error("%s", message, stacklevel=2)

    @staticmethod
    def log_verbose(message: str) -> None:
        _logger().debug("%s", message, stacklevel=2)


def _logger() -> logging.Logger:
    scope = _scope.get()
    if scope is None:
        return logging.getLogger("convoy.model")
    return logging.getLogger(f"convoy.model.{scope.model_name}")


# --- custom metrics -----------------------------------------------------------------------------------
class MetricFamily:
    """A custom metric family exported on the server's /metrics."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"

    def __init__(self, name: str, description: str, kind: str) -> None:
        if kind not in (self.COUNTER, self.GAUGE, self.HISTOGRAM):
            raise TritonModelException(
                f"MetricFamily kind must be COUNTER, GAUGE or HISTOGRAM, got {kind!r}"
            )
        services = _Binding.services
        registry = getattr(services, "metrics", None)
        if registry is None:
            raise TritonModelException("custom metrics are not available outside a server")
        self._family = registry.family(name, description, kind)
        self.name = name
        self.kind = kind

    def Metric(self, labels: dict | None = None, buckets=None) -> Metric:
        return Metric(self._family.child(labels or {}, buckets))


class Metric:
    """One labelled series of a MetricFamily."""

    def __init__(self, series) -> None:
        self._series = series

    def increment(self, value: float) -> None:
        self._series.increment(value)

    def set(self, value: float) -> None:
        self._series.set(value)

    def observe(self, value: float) -> None:
        self._series.observe(value)

    def value(self) -> float:
        return self._series.value()


# --- auto_complete_config ------------------------------------------------------------------------------
class ModelConfig:
    """What `auto_complete_config` receives: the model's config as a dict, and setters."""

    def __init__(self, model_config: dict) -> None:
        self._config = model_config

    def as_dict(self) -> dict:
        return self._config

    def max_batch_size(self) -> int:
        return int(self._config.get("max_batch_size", 0))

    def set_max_batch_size(self, max_batch_size: int) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 0:
            raise TritonModelException("set_max_batch_size: expected an integer >= 0")
        current = int(self._config.get("max_batch_size", 0))
        if current and current != max_batch_size:
            raise TritonModelException(
                f"set_max_batch_size: config.pbtxt sets max_batch_size {current}; cannot change it "
                f"to {max_batch_size}"
            )
        self._config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        self._config.setdefault("dynamic_batching", {})

    def set_model_transaction_policy(self, transaction_policy_dict: dict) -> None:
        unknown = set(transaction_policy_dict) - {"decoupled"}
        if unknown:
            raise TritonModelException(
                f"set_model_transaction_policy: unknown keys {sorted(unknown)}; expected 'decoupled'"
            )
        policy = self._config.setdefault("model_transaction_policy", {})
        policy["decoupled"] = bool(transaction_policy_dict.get("decoupled", False))

    def add_input(self, input: dict) -> None:
        self._add("input", input)

    def add_output(self, output: dict) -> None:
        self._add("output", output)

    def add_model_warmup(self, model_warmup: dict) -> None:
        self._config.setdefault("model_warmup", []).append(model_warmup)

    def _add(self, kind: str, tensor: dict) -> None:
        if not isinstance(tensor, dict) or "name" not in tensor:
            raise TritonModelException(f"add_{kind}: expected a dict with at least 'name'")
        unknown = set(tensor) - {"name", "data_type", "dims", "optional", "reshape"}
        if unknown:
            raise TritonModelException(f"add_{kind} '{tensor['name']}': unknown keys {sorted(unknown)}")
        entries = self._config.setdefault(kind, [])
        for existing in entries:
            if existing.get("name") != tensor["name"]:
                continue
            # Already declared (config.pbtxt): what the model says must agree with it.
            for key in ("data_type", "dims"):
                if key in tensor and key in existing and _same(existing[key], tensor[key]) is False:
                    raise TritonModelException(
                        f"add_{kind} '{tensor['name']}': {key} {tensor[key]} conflicts with "
                        f"{existing[key]} in config.pbtxt"
                    )
                if key in tensor and key not in existing:
                    existing[key] = tensor[key]
            return
        if "data_type" not in tensor or "dims" not in tensor:
            raise TritonModelException(f"add_{kind} '{tensor['name']}': needs data_type and dims")
        entries.append(dict(tensor))


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list | tuple):
        return [int(x) for x in a] == [int(x) for x in b]
    return a == b
