"""What both front ends share: health, metadata, statistics, repository control, submission.

Answers are plain dicts in the Open Inference Protocol's JSON shapes; the HTTP front end sends
them as they are and the gRPC front end maps them onto its messages, so each answer is written once.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from convoy import __version__
from convoy.engine.payload_log import PayloadLog
from convoy.engine.repository import ModelRepository, ModelVersion
from convoy.errors import ConvoyError, ModelLoadFailed, ModelNotFound, Unavailable
from convoy.types import Request

EXTENSIONS = [
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "statistics",
]


#: What Triton reports as a model's platform when its config names only the backend.
DEFAULT_PLATFORM = {"onnxruntime": "onnxruntime_onnx", "pytorch": "pytorch_libtorch"}


def _duration(d) -> dict:
    return {"count": d.count, "ns": d.ns}


class InferenceService:
    def __init__(
        self,
        repository: ModelRepository,
        loop: asyncio.AbstractEventLoop,
        payload_log: PayloadLog | None = None,
    ) -> None:
        self.repository = repository
        self.loop = loop
        #: Sampled payloads of opted-in models (--payload-log-dir), or None.
        self.payload_log = payload_log
        #: False once shutdown starts: readiness goes false first, then new requests are refused.
        self.accepting = True
        #: Set during the last moments of shutdown: gRPC calls refused UNAVAILABLE then wait on
        #: it, so the server stops listening while they are held rather than queued in gRPC's
        #: core, which would cancel them (see ConvoyServer._stop_grpc).
        self.held_rejections: asyncio.Event | None = None
        self.held_count = 0
        # Model code's BLS calls go through `submit` like the front ends' requests (a --workers
        # front end's mirror repository runs no model code: it has no caller).
        caller = getattr(repository, "model_caller", None)
        if caller is not None:
            caller.service = self

    # --- health and metadata ------------------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.accepting and self.repository.ready()

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.repository.get(name, version)
        except ConvoyError:
            return False
        return self.accepting

    def server_metadata(self) -> dict:
        return {"name": "convoy", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str = "") -> dict:
        model = self.repository.model(name)
        if version and (not version.isdigit() or int(version) not in model.versions):
            raise ModelNotFound(f"model '{name}' has no version {version}")
        config = model.config
        if config is None:
            raise Unavailable(f"model '{name}' is not ready: {model.reason}")
        batch = [-1] if config.max_batch_size > 0 else []

        def describe(specs):
            return [{"name": s.name, "datatype": s.datatype, "shape": [*batch, *s.dims]} for s in specs]

        return {
            "name": name,
            "versions": [str(v) for v in sorted(model.versions)],
            "platform": config.platform or DEFAULT_PLATFORM.get(config.backend, config.backend),
            "inputs": describe(config.inputs),
            "outputs": describe(config.outputs),
        }

    def model_config(self, name: str, version: str = ""):
        """The completed ModelConfig protobuf (callers serialise it for their transport)."""
        model = self.repository.model(name)
        if version and (not version.isdigit() or int(version) not in model.versions):
            raise ModelNotFound(f"model '{name}' has no version {version}")
        if model.config_proto is None:
            raise Unavailable(f"model '{name}' has no valid configuration: {model.reason}")
        return model.config_proto

    async def model_statistics(self, name: str = "", version: str = "") -> dict:
        # Async (like repository_index): a --workers front end asks the engine for them.
        if name:
            model = self.repository.model(name)
            models = [model]
            if version and (not version.isdigit() or int(version) not in model.versions):
                raise ModelNotFound(f"model '{name}' has no version {version}")
        else:
            models = [self.repository.models[n] for n in sorted(self.repository.models)]
        stats = []
        for model in models:
            for number in sorted(model.versions):
                if version and str(number) != version:
                    continue
                stats.append(self._version_statistics(model.name, model.versions[number]))
        return {"model_stats": stats}

    @staticmethod
    def _version_statistics(name: str, entry: ModelVersion) -> dict:
        s = entry.stats
        return {
            "name": name,
            "version": str(entry.version),
            "last_inference": s.last_inference_ms,
            "inference_count": s.inference_count,
            "execution_count": s.execution_count,
            "inference_stats": {
                "success": _duration(s.success),
                "fail": _duration(s.fail),
                "queue": _duration(s.queue),
                "compute_input": _duration(s.compute_input),
                "compute_infer": _duration(s.compute_infer),
                "compute_output": _duration(s.compute_output),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": _duration(b.compute_input),
                    "compute_infer": _duration(b.compute_infer),
                    "compute_output": _duration(b.compute_output),
                }
                for size, b in sorted(s.batch_stats.items())
            ],
        }

    async def repository_index(self, ready_only: bool = False) -> list[dict]:
        rows = self.repository.index()
        if ready_only:
            rows = [r for r in rows if r["state"] == "READY"]
        return rows

    async def load_model(self, name: str) -> None:
        model = await self.repository.load(name)
        if model.state != "READY":
            raise ModelLoadFailed(f"failed to load '{name}': {model.reason}")

    async def unload_model(self, name: str) -> None:
        await self.repository.unload(name)

    # --- inference ------------------------------------------------------------------------------
    def submit(self, entry: ModelVersion, request: Request) -> None:
        """Queue a request on its model's scheduler (loop thread); errors go to its future."""
        try:
            if not self.accepting:
                raise Unavailable("server is shutting down")
            scheduler = entry.scheduler
            if scheduler is None:
                raise Unavailable(f"model '{entry.config.name}' is not ready")
            scheduler.submit(request)
        except ConvoyError as exc:
            if not request.future.done():
                request.future.set_exception(exc)
        # Both front ends submit here, and every outcome (errors too) reaches the future.
        if self.payload_log is not None:
            self.payload_log.offer(entry, request)

    def submit_threadsafe(self, entry: ModelVersion, request: Request) -> None:
        """Hand a request built on another thread (gRPC) to the loop."""
        self.loop.call_soon_threadsafe(self.submit, entry, request)

    def cancel_threadsafe(self, entry: ModelVersion, request: Request) -> None:
        scheduler = entry.scheduler
        if scheduler is not None:
            self.loop.call_soon_threadsafe(scheduler.cancel, request)

    def run_threadsafe(self, coroutine) -> Future:
        """Run a control-plane coroutine (load/unload) on the loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)
