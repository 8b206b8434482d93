"""`convoy loadtest`, `convoy capacity`, `convoy soak` and `convoy tune`: argument parsing and
entry points.

convoy/cli.py registers these with `add_parsers(sub)` and hands parsed arguments of a command
in COMMANDS to `main(args)`. Importing this module is cheap; locust (and its gevent
monkey-patching) is imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

COMMANDS = ("loadtest", "capacity", "soak", "tune")
PROTOCOL_NAMES = ("http-json", "http-binary", "grpc", "grpc-stream")
DEFAULT_METRICS_URL = "http://localhost:8002/metrics"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _protocol_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in PROTOCOL_NAMES]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(PROTOCOL_NAMES)}, got {text!r}")
    return values


def _headroom(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


def _target_arguments(p: argparse.ArgumentParser, own_server: bool = False) -> None:
    """`own_server`: with neither URL given, the command starts a Convoy server itself."""
    g = p.add_argument_group("target (any Open Inference Protocol server: Convoy, Triton)")
    if own_server:
        g.add_argument("--model", default="add_sub", help="model to load (default add_sub)")
    else:
        g.add_argument("--model", required=True, help="model to load-test")
    g.add_argument("--model-version", default="", help="version (default: the server's choice)")
    fallback = "; with neither URL, a server is started" if own_server else ""
    g.add_argument(
        "--http-url",
        default=None if own_server else "localhost:8000",
        help=f"HTTP endpoint (default localhost:8000{fallback})",
    )
    g.add_argument(
        "--grpc-url",
        default=None if own_server else "localhost:8001",
        help=f"gRPC endpoint (default localhost:8001{fallback})",
    )
    g.add_argument(
        "--metrics-url",
        default=None if own_server else DEFAULT_METRICS_URL,
        help=f"Prometheus endpoint scraped around each run; '' to skip (default {DEFAULT_METRICS_URL})",
    )
    g = p.add_argument_group("payload (generated from the model metadata)")
    g.add_argument("--batch-size", type=_positive_int, default=1, help="rows per request (default 1)")
    g.add_argument(
        "--variable-length",
        type=_positive_int,
        default=16,
        help="size of every other -1 dimension (default 16)",
    )
    g.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME:D1,D2",
        help="shape of an input without the batch dimension, as perf_analyzer's --shape (repeatable)",
    )
    g.add_argument(
        "--text-words", type=_positive_int, default=12, help="most words in random BYTES text"
    )
    g.add_argument(
        "--check",
        default="auto",
        help="value check on every response: auto (by model name), none, add_sub, identity, unit_norm; "
        "ids, output names, datatypes and shapes are always checked",
    )
    g.add_argument(
        "--timeout", type=_positive_float, default=10.0, help="seconds per request (default 10)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed for the random payloads")


def add_parsers(sub) -> None:
    """Add the `loadtest`, `capacity`, `soak` and `tune` subcommands to convoy's subparsers."""
    p = sub.add_parser(
        "loadtest",
        help="drive a V2 server with locust users for a bounded time and request count",
        description="Closed-loop locust users (headless, in this process) against one model; every "
        "response is checked against its request. Exits 1 on any mismatch or if nothing succeeded.",
    )
    _target_arguments(p)
    p.add_argument(
        "--protocol",
        type=_protocol_list,
        default=("grpc",),
        help=f"comma-separated, users split evenly: {', '.join(PROTOCOL_NAMES)} (default grpc)",
    )
    p.add_argument("--users", type=_positive_int, default=8, help="concurrent users (default 8)")
    p.add_argument(
        "--duration", type=_positive_float, default=10.0, help="seconds measured (default 10)"
    )
    p.add_argument("--warmup", type=float, default=0.0, help="seconds before measuring (default 0)")
    p.add_argument(
        "--max-requests", type=_positive_int, default=100_000, help="request budget (default 100000)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")

    p = sub.add_parser(
        "capacity",
        help="step the offered load, find the most one replica serves within a p99 SLO",
        description="Runs one bounded load step per --steps value, records throughput, latency "
        "percentiles, error and rejection rates and the server's own metrics, and writes "
        "capacity.csv, capacity.json and report.html into --out.",
    )
    _target_arguments(p)
    p.add_argument("--protocol", choices=PROTOCOL_NAMES, default="grpc", help="protocol (default grpc)")
    p.add_argument(
        "--steps",
        type=_int_list,
        default=(1, 2, 4, 8, 16, 32),
        help="concurrent users per step (default 1,2,4,8,16,32)",
    )
    p.add_argument("--duration", type=_positive_float, default=10.0, help="seconds measured per step")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds per step before measuring")
    p.add_argument(
        "--max-requests",
        type=_positive_int,
        default=200_000,
        help="request budget per step (default 200000)",
    )
    p.add_argument("--slo-p99-ms", type=_positive_float, required=True, help="p99 latency objective")
    p.add_argument(
        "--max-error-rate",
        type=float,
        default=0.001,
        help="most failed+rejected requests a step may have and still meet the SLO (default 0.001)",
    )
    p.add_argument(
        "--target-rps", type=_positive_float, default=None, help="requests/s to plan replicas for"
    )
    p.add_argument("--headroom", type=_headroom, default=0.3, help="capacity kept spare (default 0.3)")
    p.add_argument("--out", type=Path, default=Path("capacity-report"), help="report folder")

    p = sub.add_parser(
        "soak",
        help="hold a bounded load for a long time and report RSS and latency drift",
        description="Runs --duration seconds of closed-loop load in --window second windows "
        "(starting a Convoy server itself when no URL is given), samples the server's resident "
        "memory before, during and after, and writes soak.json and soak.md into --out. Exits 1 "
        "when RSS grew past a threshold, on any mismatch, or if nothing succeeded.",
    )
    _target_arguments(p, own_server=True)
    p.add_argument("--protocol", type=_protocol_list, default=("grpc",), help="as for loadtest")
    p.add_argument("--users", type=_positive_int, default=8, help="concurrent users (default 8)")
    p.add_argument(
        "--duration", type=_positive_float, default=600.0, help="seconds of load (default 600)"
    )
    p.add_argument("--window", type=_positive_float, default=30.0, help="seconds per window (30)")
    p.add_argument(
        "--max-requests",
        type=_positive_int,
        default=10_000_000,
        help="request budget per window (default 10000000)",
    )
    p.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=100.0,
        help="fail when the last window's RSS exceeds the idle RSS before the load by more (100)",
    )
    p.add_argument(
        "--max-rss-slope-mb-per-hour",
        type=float,
        default=None,
        help="fail when the fitted RSS slope exceeds this (default: not checked)",
    )
    p.add_argument(
        "--server-pid",
        type=_positive_int,
        default=None,
        help="pid of the server given by URL, to read its RSS (and its workers') from /proc; "
        "otherwise process_resident_memory_bytes from --metrics-url",
    )
    g = p.add_argument_group("server started by the run (no URL given)")
    g.add_argument("--model-repository", type=Path, default=None, help="default: the demo models")
    g.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `convoy serve` argument, e.g. --server-arg=--isolation=process (repeatable)",
    )
    p.add_argument("--out", type=Path, default=Path("soak-report"), help="report folder")

    p = sub.add_parser(
        "tune",
        help="search max_batch_size, instances, queue delay and preferred sizes for the most "
        "throughput within a p99 objective",
        description="Loads candidate configs of one model (Triton's load with a config override) "
        "on a running server (--url) or on one it starts (--model-repository), measures each with "
        "a short concurrency ramp, and writes the best config.pbtxt, tune.html and tune.json into "
        "--output. The model's original config is restored at the end unless --apply. Exits 1 "
        "when no candidate met the objective (no config is written).",
    )
    _target_arguments(p, own_server=True)
    g = p.add_argument_group("server")
    g.add_argument(
        "--url",
        default=None,
        help="the running server's endpoint for --protocol (HTTP or gRPC host:port); or give "
        "--http-url/--grpc-url",
    )
    g.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="start a server on this repository (free loopback ports) and stop it at the end; "
        "default with no URL: the demo models",
    )
    g.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `convoy serve` argument for the server tune starts (repeatable)",
    )
    g.add_argument(
        "--base-config",
        type=Path,
        default=None,
        help="config.pbtxt the candidates and the written config start from (default: the "
        "repository's with --model-repository, else the config the server serves)",
    )
    p.add_argument("--protocol", choices=PROTOCOL_NAMES, default="grpc", help="protocol (default grpc)")
    p.add_argument("--slo-p99-ms", type=_positive_float, required=True, help="p99 latency objective")
    p.add_argument(
        "--max-error-rate",
        type=float,
        default=0.001,
        help="most failed+rejected requests a level may have and still meet the objective",
    )
    g = p.add_argument_group("search")
    g.add_argument(
        "--budget", type=_positive_float, default=300.0, help="seconds for the search (default 300)"
    )
    g.add_argument(
        "--duration", type=_positive_float, default=3.0, help="seconds measured per ramp level (3)"
    )
    g.add_argument("--warmup", type=float, default=0.5, help="seconds per level before measuring")
    g.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=128,
        help="most concurrent users a ramp goes to (default 128)",
    )
    g.add_argument(
        "--max-batch-size-limit",
        type=_positive_int,
        default=128,
        help="largest max_batch_size tried (powers of two up to it; default 128)",
    )
    g.add_argument(
        "--max-instance-count",
        type=_positive_int,
        default=5,
        help="most instances per instance group tried (default 5)",
    )
    g.add_argument(
        "--max-candidates", type=_positive_int, default=None, help="stop after this many candidates"
    )
    g.add_argument(
        "--max-requests",
        type=_positive_int,
        default=200_000,
        help="request budget per level (default 200000)",
    )
    p.add_argument(
        "--apply",
        action="store_true",
        help="leave the best config loaded on the server instead of restoring the original",
    )
    p.add_argument("--output", type=Path, default=Path("tune-report"), help="report folder")


def main(args: argparse.Namespace) -> int:
    """Run a parsed `loadtest`, `capacity`, `soak` or `tune` command; returns the exit code."""
    from rich.console import Console

    console = Console(stderr=True)
    started = None
    if args.command == "tune":
        try:
            started = _tune_server(args, console)
        except (RuntimeError, OSError, ValueError) as exc:
            _error(console, f"convoy tune: {exc}")
            return 2
    if args.command == "soak":
        if args.http_url is None and args.grpc_url is None:
            from convoy.cli import demo_repository

            from .soak import StartedServer

            repository = args.model_repository or demo_repository()
            try:
                started = StartedServer.start(repository, args.server_arg, args.out / "server")
            except (RuntimeError, OSError) as exc:
                _error(console, f"convoy soak: {exc}")
                return 2
            args.http_url, args.grpc_url = started.http_url, started.grpc_url
            args.metrics_url = started.metrics_url
            args.server_pid = started.process.pid
        args.http_url = args.http_url or "localhost:8000"
        args.grpc_url = args.grpc_url or "localhost:8001"
        if args.metrics_url is None:
            args.metrics_url = DEFAULT_METRICS_URL
    try:
        return _run_command(args, console)
    finally:
        if started is not None:
            started.stop()


def _tune_server(args: argparse.Namespace, console):
    """Settle `convoy tune`'s endpoints: --url for its protocol, or a server it starts on
    --model-repository (the demo models when nothing is given). Returns the started server."""
    family = "http" if args.protocol.startswith("http") else "grpc"
    if args.url is not None:
        if args.model_repository is not None:
            raise ValueError("give --url (a running server) or --model-repository, not both")
        setattr(args, f"{family}_url", args.url)
    if args.http_url is not None or args.grpc_url is not None:
        if args.model_repository is not None:
            raise ValueError("give a server URL or --model-repository, not both")
        args.http_url = args.http_url or "localhost:8000"
        args.grpc_url = args.grpc_url or "localhost:8001"
        if args.metrics_url is None:
            args.metrics_url = DEFAULT_METRICS_URL
        return None
    from convoy.cli import demo_repository

    from .soak import StartedServer

    repository = args.model_repository or demo_repository()
    if not (repository / args.model).is_dir():
        raise ValueError(f"--model: no folder '{args.model}' in the model repository {repository}")
    args.model_repository = repository
    console.print(f"convoy tune: starting a server on {repository}", markup=False)
    started = StartedServer.start(
        repository,
        ["--model-control-mode", "explicit", "--load-model", args.model, *args.server_arg],
        args.output / "server",
    )
    args.http_url, args.grpc_url = started.http_url, started.grpc_url
    if args.metrics_url is None:
        args.metrics_url = started.metrics_url
    return started


def _run_command(args: argparse.Namespace, console) -> int:
    try:
        from .checks import choose_oracle
        from .payloads import ModelSpecError, PayloadGenerator, PayloadOptions, parse_shape_option
        from .runner import fetch_model_spec  # imports locust: monkey-patches for gevent
        from .users import Target
    except ImportError as exc:
        _error(
            console,
            f"convoy {args.command} needs {exc.name}: pip install 'convoy-inference[loadtest]'",
        )
        return 2

    protocols = args.protocol if isinstance(args.protocol, tuple) else (args.protocol,)
    family = "http" if any(p.startswith("http") for p in protocols) else "grpc"
    url = args.http_url if family == "http" else args.grpc_url
    try:
        model = fetch_model_spec(url, family, args.model, args.model_version, args.timeout)
    except Exception as exc:  # unreachable, unknown model, not a V2 server
        _error(console, f"convoy {args.command}: cannot read model '{args.model}' at {url}: {exc}")
        return 2
    try:
        shapes = dict(parse_shape_option(s) for s in args.shape)
        options = PayloadOptions(args.batch_size, args.variable_length, shapes, args.text_words)
        PayloadGenerator(model, options).next()  # fail now if no payload fits the model
        target = Target(
            model=model,
            http_url=args.http_url,
            grpc_url=args.grpc_url,
            payload=options,
            oracle=choose_oracle(model, args.check),
            timeout_s=args.timeout,
            seed=args.seed,
        )
    except (ValueError, ModelSpecError) as exc:
        _error(console, f"convoy {args.command}: {exc}")
        return 2
    if args.command == "loadtest":
        return _loadtest(args, target, console)
    if args.command == "soak":
        return _soak(args, target, console)
    if args.command == "tune":
        from .tune_cli import tune

        return tune(args, target, console)
    return _capacity(args, target, console)


def _error(console, text: str, style: str = "red") -> None:
    # markup=False: messages hold shapes such as [2, 8] that rich would read as tags.
    console.print(text, style=style, markup=False)


def _loadtest(args, target, console) -> int:
    from rich.console import Console
    from rich.table import Table

    from .runner import LoadPlan, run_load
    from .views import LiveProgress

    plan = LoadPlan(args.protocol, args.users, args.duration, args.max_requests, args.warmup)
    with LiveProgress(console) as progress:
        progress.step_started(1, args.users, label=f"{','.join(args.protocol)} x{args.users}")
        result = run_load(target, plan, args.metrics_url or None, on_tick=progress.tick)
    table = Table(title=f"convoy loadtest: {target.model.name}, {args.users} users")
    for column in (
        "protocol",
        "requests",
        "ok",
        "rejected",
        "mismatch",
        "errors",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
    ):
        table.add_column(column, justify="right")
    for protocol, s in [*result.by_protocol.items(), ("all", result.summary)]:
        table.add_row(
            protocol,
            str(s.requests),
            str(s.successes),
            str(s.rejections),
            str(s.mismatches),
            str(s.errors),
            f"{s.throughput_rps:,.0f}",
            *(f"{v:.2f}" if v is not None else "n/a" for v in (s.p50_ms, s.p90_ms, s.p99_ms)),
        )
    _stdout_console(Console).print(table)
    for message, count in result.failure_messages.items():
        _error(console, f"{count} x {message}", style="yellow")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "model": target.model.name,
            "users": result.users,
            "protocols": list(args.protocol),
            "total": asdict(result.summary),
            "by_protocol": {p: asdict(s) for p, s in result.by_protocol.items()},
            "server": asdict(result.server),
            "client_cpu_percent": result.client_cpu_percent,
            "failures": result.failure_messages,
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 1 if result.summary.mismatches or not result.summary.successes else 0


def _soak(args, target, console) -> int:
    from .soak import RssProbe, SoakReport, drift, exceeded, markdown, run_soak, write_report

    probe = RssProbe(args.server_pid, args.metrics_url or None)

    def on_window(row, count) -> None:
        console.print(
            f"window {row.index + 1}/{count}: {row.throughput_rps:,.0f} req/s, p50 "
            f"{row.p50_ms or 0:.2f} ms, p99 {row.p99_ms or 0:.2f} ms, RSS {row.rss_mb or 0:.1f} MB",
            markup=False,
        )

    windows, idle_before, idle_after, failures = run_soak(
        target,
        args.protocol,
        args.users,
        args.duration,
        args.window,
        probe,
        args.max_requests,
        on_window,
    )
    result = drift(windows, idle_before, idle_after)
    report = SoakReport(
        target={
            "model": target.model.name,
            "http_url": args.http_url,
            "grpc_url": args.grpc_url,
            "server_pid": args.server_pid,
            "rss_source": probe.source,
        },
        plan={
            "protocols": list(args.protocol),
            "users": args.users,
            "duration_s": args.duration,
            "window_s": args.window,
            "windows": len(windows),
        },
        windows=windows,
        drift=result,
        thresholds={
            "max_rss_growth_mb": args.max_rss_growth_mb,
            "max_rss_slope_mb_per_hour": args.max_rss_slope_mb_per_hour,
        },
        exceeded=exceeded(result, args.max_rss_growth_mb, args.max_rss_slope_mb_per_hour),
        failures=failures,
    )
    paths = write_report(report, args.out)
    print(markdown(report))
    print(f"report: {paths['markdown']} ({paths['json'].name})")
    for message, count in failures.items():
        _error(console, f"{count} x {message}", style="yellow")
    if report.exceeded:
        _error(console, "convoy soak: " + "; ".join(report.exceeded))
        return 1
    mismatches = sum(w.mismatches for w in windows)
    return 1 if mismatches or not sum(w.successes for w in windows) else 0


def _capacity(args, target, console) -> int:
    from rich.console import Console

    from .capacity import CapacityPlan, Slo, measure_steps, recommend
    from .metrics import SERVER_METRICS
    from .report import CapacityReport, write_report
    from .views import LiveProgress, steps_table

    plan = CapacityPlan(args.protocol, args.steps, args.duration, args.warmup, args.max_requests)
    slo = Slo(args.slo_p99_ms, args.max_error_rate)
    with LiveProgress(console) as progress:
        rows, results = measure_steps(target, plan, slo, args.metrics_url or None, progress)
    recommendation = recommend(rows, slo, args.target_rps, args.headroom)
    seen = set().union(*(r.server_metric_names for r in results))
    failures: dict[str, int] = {}
    for result in results:
        for message, count in result.failure_messages.items():
            failures[message] = failures.get(message, 0) + count
    report = CapacityReport(
        target={
            "model": target.model.name,
            "version": target.model.version,
            "protocol": args.protocol,
            "http_url": args.http_url,
            "grpc_url": args.grpc_url,
            "metrics_url": args.metrics_url,
        },
        payload={
            "batch_size": args.batch_size,
            "variable_length": args.variable_length,
            "shapes": {k: list(v) for k, v in target.payload.shapes.items()},
            "check": args.check,
        },
        plan=plan,
        slo=slo,
        steps=rows,
        recommendation=recommendation,
        server_metrics_seen=[m for m in SERVER_METRICS if m in seen],
        failures=failures,
    )
    paths = write_report(report, args.out)
    out = _stdout_console(Console)
    out.print(
        steps_table(
            rows, recommendation, title=f"convoy capacity: {target.model.name} over {args.protocol}"
        )
    )
    out.print(recommendation.summary)
    out.print(f"report: {paths['html']}  ({paths['csv'].name}, {paths['json'].name})")
    if any(row.mismatches for row in rows):
        console.print(
            "[red]some responses did not match their requests: see the report's failures[/red]"
        )
        return 1
    return 0


def _stdout_console(console_class):
    """Tables go to stdout; when it is not a terminal, wide enough not to truncate columns."""
    return console_class() if sys.stdout.isatty() else console_class(width=160)
