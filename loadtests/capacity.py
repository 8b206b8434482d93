"""Capacity planning: step the offered load, find the most a replica serves within a p99 SLO,
and turn a target request rate into a replica count.

    per_replica = max throughput over the steps that meet the SLO
    replicas    = ceil(target_rps / (per_replica * (1 - headroom)))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # runner and users import locust, which monkey-patches the process
    from .runner import StepResult
    from .stats import RequestRecorder
    from .users import Target


#: Client CPU (percent of one core) above which a step measured the load generator too.
CLIENT_SATURATED_CPU = 90.0
#: A step whose throughput grew less than this fraction over the step before, with more users,
#: while the load generator ran at CLIENT_BOUND_CPU or more, measured the client's limit.
FLAT_GROWTH = 0.10
CLIENT_BOUND_CPU = 80.0


def client_bound_steps(rows: list[StepRow]) -> set[int]:
    """Steps that measured the load generator rather than the server: it was saturated, or near
    its limit while throughput stopped growing as users were added."""
    bound = set()
    for previous, row in zip([None, *rows], rows, strict=False):
        if row.client_cpu_percent >= CLIENT_SATURATED_CPU or (
            previous is not None
            and row.client_cpu_percent >= CLIENT_BOUND_CPU
            and row.users > previous.users
            and row.throughput_rps < previous.throughput_rps * (1 + FLAT_GROWTH)
        ):
            bound.add(row.step)
    return bound


@dataclass(frozen=True)
class Slo:
    """A step meets the SLO when its p99 is within `p99_ms` and few enough requests failed."""

    p99_ms: float
    #: failed + rejected + mismatched requests, as a fraction of all requests in the step
    max_error_rate: float = 0.001


@dataclass(frozen=True)
class StepRow:
    """One step of the report, flat: one CSV row, one JSON object."""

    step: int
    users: int
    requests: int
    successes: int
    rejections: int
    mismatches: int
    errors: int
    elapsed_s: float
    throughput_rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    error_rate: float
    rejection_rate: float
    meets_slo: bool
    client_cpu_percent: float
    server_inferences: float | None
    server_executions: float | None
    server_mean_batch_size: float | None
    server_mean_queue_us: float | None
    server_pending_requests: float | None
    server_gpu_utilization: float | None
    server_dispatch_reasons: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, step: int, result: StepResult, slo: Slo) -> StepRow:
        s, server = result.summary, result.server
        failed = s.error_rate + s.rejection_rate
        meets = s.successes > 0 and s.p99_ms is not None and s.p99_ms <= slo.p99_ms
        return cls(
            step=step,
            users=result.users,
            requests=s.requests,
            successes=s.successes,
            rejections=s.rejections,
            mismatches=s.mismatches,
            errors=s.errors,
            elapsed_s=s.elapsed_s,
            throughput_rps=s.throughput_rps,
            p50_ms=s.p50_ms,
            p90_ms=s.p90_ms,
            p99_ms=s.p99_ms,
            mean_ms=s.mean_ms,
            max_ms=s.max_ms,
            error_rate=s.error_rate,
            rejection_rate=s.rejection_rate,
            meets_slo=meets and failed <= slo.max_error_rate,
            client_cpu_percent=result.client_cpu_percent,
            server_inferences=server.inferences,
            server_executions=server.executions,
            server_mean_batch_size=server.mean_batch_size,
            server_mean_queue_us=server.mean_queue_us,
            server_pending_requests=server.pending_requests,
            server_gpu_utilization=server.gpu_utilization,
            server_dispatch_reasons=server.dispatch_reasons,
        )


@dataclass(frozen=True)
class Recommendation:
    """The answer to "how many replicas for target_rps at this SLO?"."""

    best_step: int | None
    per_replica_rps: float | None
    headroom: float
    usable_rps: float | None
    target_rps: float | None
    replicas: int | None
    summary: str
    #: Steps whose figures are the load generator's limit, not the server's.
    client_bound: tuple[int, ...] = ()


def recommend(
    rows: list[StepRow], slo: Slo, target_rps: float | None, headroom: float
) -> Recommendation:
    meeting = [row for row in rows if row.meets_slo]
    if not meeting:
        return Recommendation(
            None,
            None,
            headroom,
            None,
            target_rps,
            None,
            f"no step met p99 <= {slo.p99_ms:g} ms with error rate <= {slo.max_error_rate:g}: "
            "try lower concurrency steps or a looser SLO",
        )
    best = max(meeting, key=lambda row: row.throughput_rps)
    bound = tuple(sorted(client_bound_steps(rows)))
    if best.step in bound:
        # The server was not the limit: any replica count from here would be too many.
        return Recommendation(
            best.step,
            None,
            headroom,
            None,
            target_rps,
            None,
            f"client-bound: at step {best.step} ({best.users} users) the load generator ran at "
            f"{best.client_cpu_percent:.0f}% CPU and throughput stopped growing at "
            f"{best.throughput_rps:,.0f} req/s, so one replica serves at least that much; no "
            "replica count from this run. Generate the load from several processes or machines "
            "(or a faster client host) and run again",
            bound,
        )
    usable = best.throughput_rps * (1 - headroom)
    text = (
        f"one replica serves {best.throughput_rps:,.0f} req/s at p99 {best.p99_ms:.2f} ms "
        f"(step {best.step}, {best.users} users); with {headroom:.0%} headroom plan {usable:,.0f} req/s"
    )
    replicas = None
    if target_rps is not None:
        replicas = max(1, math.ceil(target_rps / usable)) if usable > 0 else None
        text += f"; {target_rps:,.0f} req/s needs {replicas} replicas"
    return Recommendation(
        best.step, best.throughput_rps, headroom, usable, target_rps, replicas, text, bound
    )


class StepProgress(Protocol):
    """What the CLI shows while the steps run."""

    def step_started(self, step: int, users: int) -> None: ...

    def tick(self, recorder: RequestRecorder, fraction: float) -> None: ...

    def step_done(self, row: StepRow) -> None: ...


@dataclass(frozen=True)
class CapacityPlan:
    """The offered-load steps and the bounds of each."""

    protocol: str
    user_steps: tuple[int, ...]
    duration_s: float
    warmup_s: float
    max_requests: int | None


def measure_steps(
    target: Target,
    plan: CapacityPlan,
    slo: Slo,
    metrics_url: str | None,
    progress: StepProgress | None = None,
) -> tuple[list[StepRow], list[StepResult]]:
    """Run every step in order; each is bounded by its duration and request count."""
    from .runner import LoadPlan, run_load

    rows, results = [], []
    for step, users in enumerate(plan.user_steps, start=1):
        if progress is not None:
            progress.step_started(step, users)
        result = run_load(
            target,
            LoadPlan((plan.protocol,), users, plan.duration_s, plan.max_requests, plan.warmup_s),
            metrics_url,
            on_tick=progress.tick if progress is not None else None,
        )
        row = StepRow.of(step, result, slo)
        rows.append(row)
        results.append(result)
        if progress is not None:
            progress.step_done(row)
    return rows, results
