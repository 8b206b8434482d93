"""One bounded load run: locust users on a local runner in this process, measured in a window.

A run spawns all its users at once, lets them warm up, scrapes the server's metrics, measures
for `duration_s` (or until `max_requests` have been sent and answered), scrapes again and
stops. Nothing outlives it: users get `timeout_s` to finish the request they are in, then are
killed. Importing this module monkey-patches the process for gevent (see users.py).
"""

from __future__ import annotations

from . import gevent_setup  # noqa: F401  (first: monkey-patches this process)

# isort: split
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import psutil
import tritonclient.http as httpclient
from gevent.event import Event
from locust.env import Environment

from .grpc_client import GrpcInferClient
from .metrics import SERVER_METRICS, ServerStepMetrics, scrape
from .payloads import ModelSpec
from .stats import LoadSummary, RequestRecorder
from .users import PROTOCOLS, RequestBudget, Target, host_port, user_classes

__all__ = ["PROTOCOLS", "LoadPlan", "StepResult", "fetch_model_spec", "run_load"]

#: How often the run checks its bounds and reports progress.
TICK_S = 0.1


@dataclass(frozen=True)
class LoadPlan:
    """How hard and for how long: `users` closed-loop users split evenly over `protocols`."""

    protocols: tuple[str, ...]
    users: int
    duration_s: float
    max_requests: int | None
    warmup_s: float = 0.0


@dataclass(frozen=True)
class StepResult:
    """The client's and the server's numbers for one run."""

    users: int
    summary: LoadSummary
    #: protocol -> its share of the requests
    by_protocol: dict[str, LoadSummary]
    server: ServerStepMetrics
    #: which of the families the report reads the server exposed
    server_metric_names: frozenset[str]
    client_cpu_percent: float
    failure_messages: dict[str, int]


def fetch_model_spec(
    target_url: str, protocol: str, model: str, version: str, timeout_s: float
) -> ModelSpec:
    """Metadata (and, where the server has the extension, config) of `model` over `protocol`."""
    if protocol.startswith("grpc"):
        client = GrpcInferClient(host_port(target_url), timeout_s)
        try:
            metadata = client.model_metadata(model, version)
            # Protobuf JSON writes int64 shapes as strings and leaves out zero fields such as
            # max_batch_size: ModelSpec converts with int() and defaults to 0.
            config = client.model_config(model, version)
        finally:
            client.close()
    else:
        from tritonclient.utils import InferenceServerException

        client = httpclient.InferenceServerClient(
            host_port(target_url), connection_timeout=timeout_s, network_timeout=timeout_s
        )
        try:
            metadata = client.get_model_metadata(model, version)
            try:
                config = client.get_model_config(model, version)
            except InferenceServerException:
                config = None
        finally:
            client.close()
    return ModelSpec.from_metadata(metadata, config, version)


def run_load(
    target: Target,
    plan: LoadPlan,
    metrics_url: str | None,
    on_tick: Callable[[RequestRecorder, float], None] | None = None,
) -> StepResult:
    """Run `plan` against `target`; `on_tick(recorder, fraction_done)` is called as it goes."""
    logging.getLogger("locust").setLevel(logging.ERROR)
    budget = RequestBudget(plan.max_requests)
    env = Environment(
        user_classes=user_classes(list(plan.protocols), target, budget),
        stop_timeout=target.timeout_s,
        catch_exceptions=True,
    )
    recorder = RequestRecorder()
    env.events.request.add_listener(recorder.on_request)
    spawned = Event()
    env.events.spawning_complete.add_listener(lambda user_count, **_: spawned.set())
    runner = env.create_local_runner()
    process = psutil.Process()
    try:
        runner.start(plan.users, spawn_rate=plan.users)
        spawned.wait(timeout=max(plan.duration_s, 10.0))
        warmup_end = _now() + plan.warmup_s
        while _now() < warmup_end and not budget.exhausted:
            _tick(on_tick, recorder, 0.0)
        before = scrape(metrics_url)
        process.cpu_percent(None)
        recorder.open_window()
        window_end = _now() + plan.duration_s
        while _now() < window_end:
            if budget.exhausted and recorder.completed >= budget.taken:
                break
            _tick(on_tick, recorder, recorder.elapsed_s / plan.duration_s)
        recorder.close_window()
        cpu = process.cpu_percent(None)
        # Scraped while the users still run: the gauges show the server under this load.
        after = scrape(metrics_url)
    finally:
        runner.quit()
    if on_tick is not None:
        on_tick(recorder, 1.0)
    elapsed = recorder.elapsed_s
    return StepResult(
        users=plan.users,
        summary=LoadSummary.of(recorder.total, elapsed),
        by_protocol={
            protocol: LoadSummary.of(outcomes, elapsed)
            for (protocol, _name), outcomes in sorted(recorder.by_request.items())
        },
        server=ServerStepMetrics.between(before, after, target.model.name),
        server_metric_names=frozenset(m for m in SERVER_METRICS if after is not None and after.has(m)),
        client_cpu_percent=cpu,
        failure_messages=dict(recorder.failure_messages),
    )


def _now() -> float:
    return time.perf_counter()


def _tick(on_tick, recorder: RequestRecorder, fraction: float) -> None:
    gevent.sleep(TICK_S)
    if on_tick is not None:
        on_tick(recorder, min(fraction, 1.0))
