"""`convoy tune`'s flow: read the model's config, search, write the report and config.pbtxt,
and leave the server's model as it was (or with the best config, with --apply)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import UTC, datetime

from .capacity import Slo
from .tune import SearchSpace, TunePlan, choose, load_meter, run_tune
from .tune_config import (
    ControlError,
    GrpcTransport,
    HttpTransport,
    ModelControl,
    TuneConfigError,
    candidate_of,
    from_served,
    read_pbtxt,
    to_pbtxt,
    tunable,
    with_candidate,
)
from .tune_report import TuneReport, write_report


def tune(args: argparse.Namespace, target, console) -> int:
    """Run the search for a parsed `convoy tune`; returns the exit code (0: a config was
    written, 1: no candidate met the objective, 2: the model or server cannot be tuned, 130:
    interrupted, with the report of what was measured)."""
    from .users import host_port
    from .views import TuneLiveProgress

    own_server = args.url is None and args.model_repository is not None
    http = args.protocol.startswith("http")
    url = host_port(args.http_url if http else args.grpc_url)
    model, version = target.model.name, target.model.version
    transport = (HttpTransport if http else GrpcTransport)(url, model, version)
    try:
        try:
            served = transport.model_config()
        except Exception as exc:  # a plain KServe V2 server has no config API; tune needs it
            console.print(
                f"convoy tune: cannot read model '{model}''s config at {url}: {exc}",
                style="red",
                markup=False,
            )
            return 2
        try:
            base = from_served(served)
            written = args.model_repository / model / "config.pbtxt" if own_server else None
            if args.base_config is not None:
                base = read_pbtxt(args.base_config)
            elif written is not None and written.is_file():
                # The user's own file, not the server's completed view of it.
                base = read_pbtxt(written)
            tunable(from_served(served))
        except (TuneConfigError, ControlError) as exc:
            console.print(f"convoy tune: {exc}", style="red", markup=False)
            return 2
        control = ModelControl(transport, base, served)
        baseline = candidate_of(from_served(served))
        space = SearchSpace.of(
            baseline,
            args.max_batch_size_limit,
            args.max_instance_count,
            min_batch=args.batch_size if target.model.batched else 1,
        )
        plan = TunePlan(
            protocol=args.protocol,
            budget_s=args.budget,
            level_duration_s=args.duration,
            level_warmup_s=args.warmup,
            max_users=args.max_concurrency,
            max_requests=args.max_requests,
            max_candidates=args.max_candidates,
        )
        slo = Slo(args.slo_p99_ms, args.max_error_rate)
        started = time.monotonic()
        trials: list = []
        interrupted = False
        # SIGTERM stops the search as Ctrl-C does: the model is restored, the report written.
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            with TuneLiveProgress(console, args.budget, space.most_candidates) as progress:
                measure = load_meter(target, plan, slo, args.metrics_url or None, progress)
                run_tune(control, measure, baseline, space, plan, progress, into=trials)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            # Whatever happened, the server's model goes back as it was.
            best_so_far = choose(trials, slo).best
            state = _leave_server(control, args, own_server, best_so_far, baseline)
            signal.signal(signal.SIGTERM, previous)
        elapsed = time.monotonic() - started
    finally:
        transport.close()
    choice = choose(trials, slo)
    config_text = None
    if choice.best is not None:
        best = choice.best
        header = (
            f"Written by convoy tune {datetime.now(UTC).isoformat(timespec='seconds')}: "
            f"{best.candidate.label}\n{best.throughput_rps:,.0f} req/s at p99 {best.p99_ms:.2f} ms "
            f"with {best.point.users} concurrent {args.protocol} users (objective p99 <= "
            f"{slo.p99_ms:g} ms)"
        )
        config_text = to_pbtxt(with_candidate(base, best.candidate), header)
    report = TuneReport(
        target={"model": model, "version": version, "url": url, "protocol": args.protocol},
        plan=plan,
        slo=slo,
        baseline=baseline,
        trials=trials,
        choice=choice,
        elapsed_s=elapsed,
        server_state=state,
        config_text=config_text,
    )
    paths = write_report(report, args.output)
    out = sys.stdout
    print(choice.summary, file=out)
    print(f"server: {state}", file=out)
    written = f"{paths['config']}, " if "config" in paths else ""
    print(f"report: {written}{paths['html']} ({paths['json'].name})", file=out)
    if interrupted:
        console.print(
            f"convoy tune: interrupted; the report covers the {len(trials)} candidate(s) measured",
            style="red",
            markup=False,
        )
        return 130
    if choice.best is None:
        console.print(f"convoy tune: {choice.summary}", style="red", markup=False)
        return 1
    return 0


def _leave_server(control: ModelControl, args, own_server: bool, best, baseline) -> str:
    """Restore the original config (or load the best with --apply); says what was done."""
    if own_server:
        return "stopped (tune started it; the repository's files were never changed)"
    try:
        if args.apply and best is not None and best.candidate != baseline:
            control.load(with_candidate(control.base, best.candidate))
            return f"applied: {best.candidate.label} (until the model is next loaded)"
        if control.restore():
            return "restored: the model serves its original config"
        return "restore incomplete: the served config differs from the original"
    except Exception as exc:  # the server went away, or refused: say so, never mask the run
        return f"restore failed: {type(exc).__name__}: {exc}"
