"""The interface every scheduler kind offers the engine.

Three kinds implement it: the dynamic batcher (batching/scheduler.py), the sequence batcher
(batching/sequence.py) and the ensemble scheduler (engine/ensemble.py). The engine holds one per
model version (`ModelVersion.scheduler`) and uses only these members; what one kind adds (the
dynamic batcher's batch-size limit, padding and latency plan for the metrics) is read after an
`isinstance` check on that kind.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from convoy.runtimes.base import RuntimeInstance
from convoy.types import Request


@runtime_checkable
class ModelScheduler(Protocol):
    """One model version's scheduler: takes its requests, answers each through its future."""

    async def __aenter__(self) -> ModelScheduler:
        """Start: accept requests (on the loop that will run the scheduler)."""
        ...

    async def close(self, grace: float = 30.0) -> None:
        """Stop accepting, let queued and running work finish within `grace`, fail the rest."""
        ...

    def submit(self, request: Request) -> None:
        """Queue a request; its future gets the outcome. Raises (a ConvoyError) when it cannot
        be queued: the engine hands that error to the request's future."""
        ...

    def cancel(self, request: Request) -> None:
        """The client went away: drop the request if it has not started executing."""
        ...

    @property
    def available(self) -> bool:
        """It can serve now (False while every instance is being replaced, or an ensemble's
        composing model is not ready)."""
        ...

    @property
    def restart_reason(self) -> str:
        """Why it is not available (shown as the model's readiness reason)."""
        ...

    @property
    def instances(self) -> list[RuntimeInstance]:
        """The runtime instances working for it now (closed by the repository at unload)."""
        ...

    @property
    def in_flight(self) -> int:
        """Requests queued or executing (the pending-request metric; drained at shutdown)."""
        ...

    @property
    def queue_depths(self) -> tuple[int, ...]:
        """Requests waiting at each priority level, index 0 being level 1 (the metrics)."""
        ...
