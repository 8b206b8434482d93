"""The `python` backend: a model.py defining a `Model` class that computes on numpy arrays.

    class Model:
        def initialize(self, config: dict) -> None: ...          # optional
        def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
        def finalize(self) -> None: ...                          # optional

`execute` receives a whole batch (first dimension = rows when the model batches) and returns
every output for it. `config` holds the model's name, version, folder, max_batch_size, the
declared inputs/outputs and the config's `parameters`.

A `Model` may list exception types after which it cannot be trusted (a poisoned device, a
corrupt native state) as `fatal_errors = (SomeError, ...)`: such an error fails its batch and
the model version is reloaded with fresh instances; any other exception fails only its batch.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import traceback
from dataclasses import asdict

import numpy as np

from convoy.config import ModelVersionSource
from convoy.errors import InferenceFailed, InstanceLost, ModelLoadFailed

from .base import cuda_context_lost

_module_ids = itertools.count()


class PythonRuntime:
    def __init__(self, source: ModelVersionSource, instance_index: int) -> None:
        self._source = source
        self._instance_index = instance_index
        self._model = None
        self._fatal_errors: tuple[type[BaseException], ...] = ()

    def load(self) -> None:
        config = self._source.config
        filename = config.default_model_filename or "model.py"
        path = self._source.path / filename
        if not path.is_file():
            raise ModelLoadFailed(f"{path}: python backend needs this file")
        module_name = f"convoy_model_{config.name}_{self._source.version}_{next(_module_ids)}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ModelLoadFailed(f"{path}: cannot be imported")
        module = importlib.util.module_from_spec(spec)
        # Registered so that dataclasses/pickling inside the user's module can find it.
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise ModelLoadFailed(
                f"{path}: import failed{_where(exc, path)}: {type(exc).__name__}: {exc}"
            ) from exc
        model_class = getattr(module, "Model", None)
        if model_class is None or not hasattr(model_class, "execute"):
            raise ModelLoadFailed(f"{path}: must define a class `Model` with an `execute` method")
        fatal_errors = getattr(model_class, "fatal_errors", ())
        fatal_errors = (fatal_errors,) if isinstance(fatal_errors, type) else tuple(fatal_errors)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in fatal_errors):
            raise ModelLoadFailed(f"{path}: Model.fatal_errors must be a tuple of exception types")
        try:
            model = model_class()
        except Exception as exc:
            raise ModelLoadFailed(
                f"{path}: Model() failed{_where(exc, path)}: {type(exc).__name__}: {exc}"
            ) from exc
        initialize = getattr(model, "initialize", None)
        if initialize is not None:
            self._initialize(initialize, path)
        self._model = model
        self._fatal_errors = fatal_errors

    def _initialize(self, initialize, path) -> None:
        config = self._source.config
        try:
            initialize(
                {
                    "name": config.name,
                    "version": self._source.version,
                    "path": str(self._source.path),
                    "instance_index": self._instance_index,
                    "max_batch_size": config.max_batch_size,
                    "inputs": [asdict(s) for s in config.inputs],
                    "outputs": [asdict(s) for s in config.outputs],
                    "parameters": dict(config.parameters),
                }
            )
        except Exception as exc:
            raise ModelLoadFailed(
                f"{path}: Model.initialize() failed{_where(exc, path)}: {type(exc).__name__}: {exc}"
            ) from exc

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._model.execute(inputs)
        if not isinstance(outputs, dict):
            raise InferenceFailed(
                f"model '{self._source.config.name}': execute() must return a dict of "
                f"output name -> numpy array, got {type(outputs).__name__}"
            )
        return {name: np.asarray(value) for name, value in outputs.items()}

    def is_fatal(self, error: BaseException) -> bool:
        return isinstance(error, (InstanceLost, *self._fatal_errors)) or cuda_context_lost(error)

    def close(self) -> None:
        finalize = getattr(self._model, "finalize", None)
        if finalize is not None:
            finalize()
        self._model = None


def _where(error: BaseException, path) -> str:
    """' at line N in func()': the deepest frame of the model's own file in `error`'s traceback
    (a SyntaxError names its line itself); '' when the model file is not in it."""
    if isinstance(error, SyntaxError):
        return ""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    if not frames:
        return ""
    return f" at line {frames[-1].lineno} in {frames[-1].name}()"
