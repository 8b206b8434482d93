"""`convoy` command line. The only place allowed to exit the process."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from importlib import resources
from pathlib import Path

from convoy.config import ServerConfig
from convoy.loadtests import cli as loadtests_cli


def demo_repository() -> Path:
    """The bundled demo model repository, served when no --model-repository is given."""
    return Path(str(resources.files("convoy").joinpath("demo_models")))


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model repository over gRPC and HTTP")
    p.add_argument(
        "--model-repository",
        "--model-store",
        type=Path,
        default=None,
        help="Triton-style model repository (default: the bundled demo models)",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002, help="-1 disables metrics")
    p.add_argument(
        "--max-queue-size",
        type=int,
        default=8192,
        help="bound on a model queue whose config sets no max_queue_size",
    )
    p.add_argument("--grpc-max-message-bytes", type=int, default=256 * 1024 * 1024)
    p.add_argument("--http-max-body-bytes", type=int, default=256 * 1024 * 1024)
    p.add_argument(
        "--execution-timeout",
        type=float,
        default=0.0,
        help="seconds a batch may run before its requests fail and its model instance is "
        "replaced (0: no limit; the model parameter execution_timeout_ms overrides)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="front-end processes sharing the HTTP and gRPC ports in front of one engine process "
        "that holds the models (default 1: a single process)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM/SIGINT",
    )
    p.add_argument(
        "--model-control-mode",
        choices=["none", "explicit"],
        default="none",
        help="explicit: load only --load-model models at start",
    )
    p.add_argument(
        "--load-model",
        action="append",
        default=[],
        help="model to load at start in explicit mode (repeatable)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="server log lines: text, or JSON objects (timestamp, level, logger, message, request_id)",
    )
    p.add_argument(
        "--access-log",
        nargs="?",
        const="-",
        default="",
        metavar="FILE",
        help="one line per inference request (protocol, model, version, status, duration, request "
        "id) to FILE, or to standard error without one; off by default",
    )
    p.add_argument(
        "--trace-otlp-endpoint",
        default="",
        metavar="URL",
        help="send OpenTelemetry spans (one per request, with queue and compute children) over "
        "OTLP/HTTP to URL, e.g. http://localhost:4318/v1/traces; needs the tracing extra",
    )
    p.add_argument(
        "--trace-console",
        action="store_true",
        help="print the same spans to standard output, one JSON object a line",
    )


def _settings(args) -> ServerConfig:
    repository = args.model_repository or demo_repository()
    if not repository.is_dir():
        raise SystemExit(f"convoy: --model-repository {repository} is not a directory")
    if args.workers < 1:
        raise SystemExit(f"convoy: --workers must be at least 1, got {args.workers}")
    return ServerConfig(
        model_repository=repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        grpc_max_message_bytes=args.grpc_max_message_bytes,
        http_max_body_bytes=args.http_max_body_bytes,
        max_queue_size=args.max_queue_size,
        shutdown_grace=args.shutdown_grace,
        execution_timeout=args.execution_timeout,
        load_all=args.model_control_mode == "none",
        load_models=tuple(args.load_model),
        log_level=args.log_level,
        log_format=args.log_format,
        access_log=args.access_log,
        trace_otlp_endpoint=args.trace_otlp_endpoint,
        trace_console=args.trace_console,
        workers=args.workers,
    )


async def _serve(settings: ServerConfig, log_control=None) -> None:
    if settings.workers > 1:
        from convoy.server.engine import Engine as ConvoyServer
    else:
        from convoy.server.app import ConvoyServer

    async with ConvoyServer(settings, log_control) as server:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        print(
            f"convoy: serving {settings.model_repository} "
            f"http={server.http_port} grpc={server.grpc_port} metrics={server.metrics_port}",
            flush=True,
        )
        for row in server.repository.index():
            print(
                f"convoy: model {row['name']} v{row['version']} {row['state']} {row['reason']}",
                flush=True,
            )
        await server.wait_closed()
        print("convoy: shutting down", flush=True)


def _run(coroutine) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(coroutine)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convoy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    loadtests_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command in loadtests_cli.COMMANDS:
        sys.exit(loadtests_cli.main(args))
    from convoy.server.logs import configure_logging

    log_control = configure_logging(
        getattr(args, "log_level", "INFO"), getattr(args, "log_format", "text")
    )
    if args.command == "serve":
        try:
            _run(_serve(_settings(args), log_control))
        except OSError as exc:
            print(f"convoy: {exc}", file=sys.stderr)
            sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
