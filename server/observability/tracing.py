"""Optional OpenTelemetry tracing (the `tracing` extra): one span per inference request.

Each request gets a span "infer {model}" from its arrival to its outcome, with children "queue"
(waiting for a batch), "compute" (merge, run, split) and "compute_infer" (the runtime's call)
(an ensemble: a child "step {i} {model}" per step, holding that step's "queue" and "compute"),
built after the fact from the monotonic times the scheduler stamped, so nothing runs on the
request path while tracing is off and only this record() call while it is on. Which requests are
traced is Triton's trace settings' decision (trace_level, trace_rate, trace_count: the trace
API, convoy/trace_settings.py), asked once per request. The span's parent is the client's W3C
`traceparent` (HTTP header or gRPC metadata). Spans leave through a BatchSpanProcessor on its
own thread.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from convoy.errors import status_of
from convoy.trace_settings import TraceControl, TraceSetup
from convoy.types import Request

TRACEPARENT = "traceparent"


class Tracer:
    """Turns finished requests into spans and exports them over OTLP/HTTP or to standard output."""

    def __init__(self, setup: TraceSetup, control: TraceControl) -> None:
        """`setup`: where spans go (trace_setup); `control`: which requests are traced."""
        otlp_endpoint, console = setup.otlp_endpoint, setup.console
        self._control = control
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
            from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise OSError(
                "tracing needs OpenTelemetry: pip install 'convoy-inference[tracing]'"
            ) from exc
        from convoy import __version__

        self._provider = TracerProvider(
            resource=Resource.create(
                {"service.name": "convoy", "service.version": __version__, **setup.resource}
            )
        )
        batching = {
            "max_queue_size": setup.batch.get("bsp_max_queue_size"),
            "schedule_delay_millis": setup.batch.get("bsp_schedule_delay"),
            "max_export_batch_size": setup.batch.get("bsp_max_export_batch_size"),
        }
        batching = {k: v for k, v in batching.items() if v is not None}
        if batching.get("max_export_batch_size", 0) > batching.get("max_queue_size", 1 << 62):
            batching["max_export_batch_size"] = batching["max_queue_size"]  # OTel requires it
        if otlp_endpoint:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError as exc:
                raise OSError(
                    "--trace-otlp-endpoint needs opentelemetry-exporter-otlp-proto-http: "
                    "pip install 'convoy-inference[tracing]'"
                ) from exc
            self._provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint), **batching)
            )
        if console:
            # One JSON object per line on standard output.
            exporter = ConsoleSpanExporter(
                out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + os.linesep
            )
            self._provider.add_span_processor(BatchSpanProcessor(exporter, **batching))
        self._tracer = self._provider.get_tracer("convoy")
        self._propagator = TraceContextTextMapPropagator()
        self._server_kind = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)
        self._in_context = set_span_in_context

    def record(
        self,
        protocol: str,
        model: str,
        version: str,
        request: Request,
        future: asyncio.Future,
        traceparent: str | None,
    ) -> None:
        """Emit the spans of one request whose future is resolved (or whose wait was abandoned),
        if the trace settings sample it."""
        if not self._control.sample(model, traceparent is not None):
            return
        end = time.monotonic_ns()
        to_wall = time.time_ns() - end  # monotonic ns + to_wall = wall-clock ns
        timings = None
        steps = ()
        if future.cancelled() or not future.done():
            status = "CANCELLED"
        elif (error := future.exception()) is not None:
            status = status_of(error)[0]
        else:
            status = "OK"
            timings = future.result().timings
            steps = future.result().steps
            version = future.result().model_version or version  # a roll-out's arm may differ
        parent = self._propagator.extract({TRACEPARENT: traceparent}) if traceparent else None
        span = self._tracer.start_span(
            f"infer {model}",
            context=parent,
            kind=self._server_kind,
            start_time=(request.received_ns or request.queued_ns or end) + to_wall,
            attributes={
                "convoy.model": model,
                "convoy.model_version": version,
                "convoy.protocol": protocol,
                "convoy.request_id": request.id,
                "convoy.rows": request.rows,
                "convoy.status": status,
            },
        )
        if status != "OK":
            span.set_status(self._error)
        if timings is not None:
            context = self._in_context(span)
            for name, start_ns, end_ns in (
                ("queue", request.queued_ns, timings.dispatched_ns),
                ("compute", timings.compute_start_ns, timings.done_ns),
                ("compute_infer", timings.infer_start_ns, timings.infer_end_ns),
            ):
                child = self._tracer.start_span(name, context=context, start_time=start_ns + to_wall)
                child.end(end_time=end_ns + to_wall)
        if steps:
            self._record_steps(span, steps, to_wall)
        span.end(end_time=end + to_wall)

    def _record_steps(self, span, steps, to_wall: int) -> None:
        """An ensemble's steps: a "step {i} {model}" span each, with its queue and compute."""
        context = self._in_context(span)
        for step in steps:
            child = self._tracer.start_span(
                f"step {step.index} {step.model}",
                context=context,
                start_time=step.submitted_ns + to_wall,
                attributes={
                    "convoy.model": step.model,
                    "convoy.model_version": step.version,
                    "convoy.ensemble_step": step.index,
                },
            )
            if step.timings is not None:
                inner = self._in_context(child)
                for name, start_ns, end_ns in (
                    ("queue", step.queued_ns, step.timings.dispatched_ns),
                    ("compute", step.timings.compute_start_ns, step.timings.done_ns),
                ):
                    grandchild = self._tracer.start_span(
                        name, context=inner, start_time=start_ns + to_wall
                    )
                    grandchild.end(end_time=end_ns + to_wall)
            child.end(end_time=step.finished_ns + to_wall)

    def close(self) -> None:
        """Export what is still buffered, then stop the exporter threads."""
        self._provider.shutdown()
