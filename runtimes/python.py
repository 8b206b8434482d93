"""The `python` backend: a model.py defining a `Model` class that computes on numpy arrays.

    class Model:
        def initialize(self, config: dict) -> None: ...          # optional
        def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
        def finalize(self) -> None: ...                          # optional

`execute` receives a whole batch (first dimension = rows when the model batches) and returns
every output for it. With ragged batching (batching/ragged.py) a ragged input arrives flattened
and the config's `batch_input` targets are in `inputs` too. `config` holds the model's name,
version, folder, max_batch_size, the declared inputs/outputs, batch inputs/outputs and the
config's `parameters`.

A `Model` may list exception types after which it cannot be trusted (a poisoned device, a
corrupt native state) as `fatal_errors = (SomeError, ...)`: such an error fails its batch and
the model version is reloaded with fresh instances; any other exception fails only its batch.

A model.py written for Triton's python backend (`class TritonPythonModel`, importing
`triton_python_backend_utils`) runs unchanged: see runtimes/triton_python/. Such a runtime
executes per request (`executes_requests`), and may be decoupled.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from convoy.config import ModelVersionSource
from convoy.errors import InferenceFailed, InstanceExited, InstanceLost, ModelLoadFailed

from . import exit_guard
from .base import Capabilities, RuntimeBase, cuda_context_lost, where_in_model
from .model_modules import ModelNamespace
from .triton_python import pb_utils
from .triton_python.adapter import TritonModelAdapter, install_module

log = logging.getLogger("convoy.runtimes.python")

#: What model code raises when it tries to end the process (see runtimes/exit_guard.py).
_EXITS = (exit_guard.ModelExitRefused, SystemExit, KeyboardInterrupt)


def _import_model_file(source: ModelVersionSource) -> tuple:
    """Import a version's model.py in a namespace of its own (runtimes/model_modules.py), with
    triton_python_backend_utils importable: (module, path, namespace)."""
    config = source.config
    filename = config.default_model_filename or "model.py"
    path = source.path / filename
    if not path.is_file():
        raise ModelLoadFailed(f"{path}: python backend needs this file")
    install_module()
    namespace = ModelNamespace(f"{config.name}_{source.version}", [source.path, source.path.parent])
    try:
        module = namespace.load(path)
    except Exception as exc:
        namespace.close()
        raise ModelLoadFailed(
            f"{path}: import failed{where_in_model(exc, path)}: {type(exc).__name__}: {exc}"
        ) from exc
    except BaseException:
        namespace.close()
        raise
    return module, path, namespace


def _refuse_batch_io(source: ModelVersionSource) -> None:
    """A TritonPythonModel executes request by request, never a merged batch: there is no batch
    for batch inputs to describe or batch outputs to scatter (Triton's python backend hands each
    request its own inputs too). Ragged inputs alone are fine: each request keeps its shape."""
    config = source.config
    for field, present in (("batch_input", config.batch_inputs), ("batch_output", config.batch_outputs)):
        if present:
            raise ModelLoadFailed(
                f"{source.path.parent / 'config.pbtxt'}: {field}: a TritonPythonModel executes "
                "each request with its own inputs, never a merged batch, so there is nothing to "
                f"compute {field} from; remove it (ragged inputs alone are accepted)"
            )


class PythonRuntime(RuntimeBase):
    #: Triton models may be decoupled, and their `auto_complete_config` edits the config.
    capabilities = Capabilities(decoupled=True, edits_config=True)

    def __init__(self, source: ModelVersionSource, instance_index: int) -> None:
        self._source = source
        self._instance_index = instance_index
        self._model = None
        self._fatal_errors: tuple[type[BaseException], ...] = ()
        #: Set when model.py defines a TritonPythonModel.
        self._triton: TritonModelAdapter | None = None
        #: The package model.py and its sibling modules were imported into.
        self._namespace: ModelNamespace | None = None
        #: Execute per request (a Triton model) rather than on merged batches; known after load.
        self.executes_requests = False
        #: In an isolated worker process, which model code may end (sys.exit): it is restarted.
        self._isolated = False

    @staticmethod
    def complete_config_dict(source: ModelVersionSource, config: dict) -> dict:
        """Triton's `TritonPythonModel.auto_complete_config`, when model.py has one, applied to
        the config (as Triton's JSON dict); other models leave it unchanged. Only a file that
        mentions auto_complete_config is imported here (in the server's process)."""
        path = source.path / (source.config.default_model_filename or "model.py")
        try:
            if "auto_complete_config" not in path.read_text(errors="replace"):
                return config
        except OSError:
            return config  # loading reports the missing file
        exit_guard.install()  # always in the server's process
        module, path, namespace = _import_model_file(source)
        try:
            model_class = getattr(module, "TritonPythonModel", None)
            complete = getattr(model_class, "auto_complete_config", None)
            if complete is None:
                return config
            try:
                completed = complete(pb_utils.ModelConfig(config))
            except Exception as exc:
                raise ModelLoadFailed(
                    f"{path}: auto_complete_config failed: {type(exc).__name__}: {exc}"
                ) from exc
        finally:
            # Triton's auto-complete runs in an interpreter of its own, gone afterwards.
            namespace.close()
        if not isinstance(completed, pb_utils.ModelConfig):
            raise ModelLoadFailed(
                f"{path}: auto_complete_config must return the ModelConfig it was given, got "
                f"{type(completed).__name__}"
            )
        return completed.as_dict()

    def bind_services(self, services) -> None:
        """The server's services for Triton model code (BLS calls, custom metrics)."""
        pb_utils.bind(services)
        self._isolated = services.isolated
        if not services.isolated:
            exit_guard.install()  # model code shares the server's process: it may not end it

    def _model_file(self) -> Path:
        return self._source.path / (self._source.config.default_model_filename or "model.py")

    def _exited(self, exc: BaseException, during: str) -> str:
        """What model code that tried to end the process did, for the error it gets."""
        if isinstance(exc, SystemExit):
            what = f"sys.exit({exc.code!r})"
        elif isinstance(exc, KeyboardInterrupt):
            what = "KeyboardInterrupt"
        else:
            what = str(exc)
        where = where_in_model(exc, self._model_file())
        return (
            f"model '{self._source.config.name}' instance {self._instance_index}: {during} called "
            f"{what}{where}, which would end the server's process; refused"
        )

    def load(self) -> None:
        try:
            self._load()
        except _EXITS as exc:
            if self._isolated:
                raise
            raise ModelLoadFailed(f"{self._exited(exc, 'loading')} (the model is not loaded)") from None

    def _load(self) -> None:
        config = self._source.config
        if "EXECUTION_ENV_PATH" in config.parameters:
            raise ModelLoadFailed(
                f"{self._source.path.parent / 'config.pbtxt'}: parameters.EXECUTION_ENV_PATH: "
                "conda-pack execution environments are not supported; install the model's "
                "packages into Convoy's environment (or use isolation: process with them)"
            )
        module, path, self._namespace = _import_model_file(self._source)
        model_class = getattr(module, "Model", None)
        triton_class = getattr(module, "TritonPythonModel", None)
        if model_class is None and triton_class is not None:
            if config.padding is not None:
                raise ModelLoadFailed(
                    f"{self._source.path.parent / 'config.pbtxt'}: parameters.padding_inputs: a "
                    "TritonPythonModel executes requests one by one, so they are never padded "
                    "into a batch; padded batching needs a `Model` class (a merged batch)"
                )
            if not hasattr(triton_class, "execute"):
                raise ModelLoadFailed(f"{path}: TritonPythonModel must define `execute`")
            _refuse_batch_io(self._source)
            adapter = TritonModelAdapter(triton_class, self._source, self._instance_index, path)
            adapter.load()
            self._triton = adapter
            self.executes_requests = True
            return
        if config.decoupled:
            raise ModelLoadFailed(
                f"{path}: model_transaction_policy.decoupled needs a TritonPythonModel (a `Model` "
                "returns one response per batch)"
            )
        if model_class is None or not hasattr(model_class, "execute"):
            raise ModelLoadFailed(
                f"{path}: must define a class `Model` (or Triton's `TritonPythonModel`) with an "
                "`execute` method"
            )
        fatal_errors = getattr(model_class, "fatal_errors", ())
        fatal_errors = (fatal_errors,) if isinstance(fatal_errors, type) else tuple(fatal_errors)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in fatal_errors):
            raise ModelLoadFailed(f"{path}: Model.fatal_errors must be a tuple of exception types")
        try:
            model = model_class()
        except Exception as exc:
            raise ModelLoadFailed(
                f"{path}: Model() failed{where_in_model(exc, path)}: {type(exc).__name__}: {exc}"
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
                    "batch_inputs": [asdict(b) for b in config.batch_inputs],
                    "batch_outputs": [asdict(b) for b in config.batch_outputs],
                }
            )
        except Exception as exc:
            where = where_in_model(exc, path)
            raise ModelLoadFailed(
                f"{path}: Model.initialize() failed{where}: {type(exc).__name__}: {exc}"
            ) from exc

    def infer_requests(self, batch: list, loop) -> list:
        """Execute a batch request by request (a TritonPythonModel): per request its outputs,
        an exception, or None when the request is answered through its stream (decoupled)."""
        try:
            return self._triton.execute(batch, loop)
        except _EXITS as exc:
            if self._isolated:
                raise
            raise InstanceExited(f"{self._exited(exc, 'execute()')}; restarting the instance") from None

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._infer(inputs)
        except _EXITS as exc:
            if self._isolated:
                raise
            raise InstanceExited(f"{self._exited(exc, 'execute()')}; restarting the instance") from None

    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._triton is not None:
            return self._infer_merged(inputs)
        outputs = self._model.execute(inputs)
        if not isinstance(outputs, dict):
            raise InferenceFailed(
                f"model '{self._source.config.name}': execute() must return a dict of "
                f"output name -> numpy array, got {type(outputs).__name__}"
            )
        return {name: np.asarray(value) for name, value in outputs.items()}

    def is_fatal(self, error: BaseException) -> bool:
        return isinstance(error, (InstanceLost, *self._fatal_errors)) or cuda_context_lost(error)

    def _infer_merged(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A merged batch (warm-up) through a TritonPythonModel: one request holding it."""
        from convoy.types import DetachedFuture, Request

        rows = next(iter(inputs.values())).shape[0] if self._source.config.max_batch_size else 1
        request = Request("warmup", inputs, (), rows, future=DetachedFuture())
        if self._source.config.decoupled:
            self._triton.warm_up_decoupled(request)
            return {}
        (result,) = self._triton.execute([request], loop=None)
        if isinstance(result, BaseException):
            raise result
        return dict(result or {})

    def close(self) -> None:
        try:
            self._close()
        except _EXITS as exc:
            if self._isolated:
                raise
            log.error("%s", self._exited(exc, "finalize()"))

    def _close(self) -> None:
        try:
            if self._triton is not None:
                adapter, self._triton = self._triton, None
                adapter.close()
                return
            finalize = getattr(self._model, "finalize", None)
            if finalize is not None:
                finalize()
            self._model = None
        finally:
            if self._namespace is not None:
                self._namespace.close()
                self._namespace = None
