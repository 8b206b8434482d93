"""`convoy rollout start|status|promote|abort|report` against a running server's roll-out admin API
(HTTP: /v2/rollouts/...). Standard library only: it runs wherever `convoy` is installed."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

#: Where the API key comes from when --api-key is not given.
KEY_ENV = "CONVOY_API_KEY"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rollout",
        help="shadow, canary and A/B roll-outs on a running server: start, status, promote, "
        "abort, report",
    )
    verbs = p.add_subparsers(dest="verb", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--url", default="http://localhost:8000", help="the server's HTTP address")
        parser.add_argument(
            "--api-key", default=None, help=f"a key with --manage to change things (default ${KEY_ENV})"
        )
        parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call")

    start = verbs.add_parser("start", help="start a roll-out (the server needs --rollout-state)")
    start.add_argument("model")
    start.add_argument("--file", type=Path, help="the roll-out's JSON spec (flags below override it)")
    start.add_argument("--stable", type=int, help="the version serving now")
    start.add_argument("--candidate", type=int, help="the version to prove")
    start.add_argument("--mode", choices=["shadow", "canary", "ab"])
    start.add_argument(
        "--steps", help="comma-separated: shadow and candidate percentages, e.g. shadow,1,10,50,100"
    )
    start.add_argument("--bake", type=float, metavar="SECONDS", help="bake time per step")
    start.add_argument("--min-samples", type=int, help="samples every guard needs")
    start.add_argument("--max-p99-ratio", type=float, help="candidate p99 / stable p99 allowed")
    start.add_argument("--max-error-rate-delta", type=float, help="error-rate increase allowed")
    start.add_argument("--min-agreement", type=float, help="share of agreeing pairs needed")
    start.add_argument("--split-header", help="split callers by this header (default: API key)")
    common(start)
    status = verbs.add_parser("status", help="one model's roll-out, or all of them")
    status.add_argument("model", nargs="?", default="")
    status.add_argument("--json", action="store_true", help="the whole status document")
    common(status)
    for verb, text in (
        ("promote", "make the candidate stable now"),
        ("abort", "roll back (or revert a promotion, or release a rolled-back candidate)"),
    ):
        parser = verbs.add_parser(verb, help=text)
        parser.add_argument("model")
        common(parser)
    report = verbs.add_parser("report", help="write report.html and report.json")
    report.add_argument("model")
    report.add_argument("--out", type=Path, default=Path("rollout-report"), help="output folder")
    common(report)


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    document: dict[str, Any] = {}
    if args.file is not None:
        document = json.loads(args.file.read_text())
        if not isinstance(document, dict):
            raise ValueError(f"{args.file}: expected a JSON object")
    for flag, field in (("stable", "stable"), ("candidate", "candidate"), ("mode", "mode")):
        if getattr(args, flag) is not None:
            document[field] = getattr(args, flag)
    if args.steps:
        steps = []
        for item in args.steps.split(","):
            item = item.strip()
            steps.append(item if item == "shadow" else float(item))
        document["steps"] = steps
    if args.bake is not None:
        document["bake_seconds"] = args.bake
    guards = dict(document.get("guards") or {})
    for flag in ("min_samples", "max_p99_ratio", "max_error_rate_delta", "min_agreement"):
        if getattr(args, flag) is not None:
            guards[flag] = getattr(args, flag)
    if guards:
        document["guards"] = guards
    if args.split_header:
        document["split"] = {"header": args.split_header}
    return document


class CallFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _call(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    url = args.url.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method=method)
    request.add_header("content-type", "application/json")
    key = args.api_key or os.environ.get(KEY_ENV)
    if key:
        request.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as answer:
            document: dict[str, Any] = json.loads(answer.read() or b"{}")
            return document
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError):
            message = ""
        raise CallFailed(exc.code, message or f"HTTP {exc.code}") from None


def _line(status: dict[str, Any]) -> str:
    step = status["step"]
    where = f"step {step['index'] + 1}/{step['of']} {step['label']}"
    if status["state"] in ("running", "ready") and step.get("elapsed_s") is not None:
        where += f" ({step['elapsed_s']:.0f} of {step['bake_seconds']:g} s)"
    decision = status.get("decision") or {}
    why = decision.get("reason") or status.get("reason") or ""
    return (
        f"{status['model']}: {status['state']} {status['mode']} v{status['stable']} -> "
        f"v{status['candidate']}, {where}, candidate weight {status['candidate_weight']:.0%}"
        + (f"; {why}" if why else "")
    )


def main(args: argparse.Namespace) -> int:
    try:
        if args.verb == "start":
            status = _call(args, "POST", f"/v2/rollouts/{args.model}/start", _spec(args))
            print(_line(status))
        elif args.verb == "status":
            path = f"/v2/rollouts/{args.model}" if args.model else "/v2/rollouts"
            answer = _call(args, "GET", path)
            if args.json:
                print(json.dumps(answer, indent=2))
            else:
                statuses = answer["rollouts"] if not args.model else [answer]
                if not statuses:
                    print("no roll-outs")
                for status in statuses:
                    print(_line(status))
        elif args.verb in ("promote", "abort"):
            status = _call(args, "POST", f"/v2/rollouts/{args.model}/{args.verb}")
            print(_line(status))
        elif args.verb == "report":
            from convoy.engine.rollout.report import render_html

            document = _call(args, "GET", f"/v2/rollouts/{args.model}/report")
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "report.json").write_text(json.dumps(document, indent=2))
            (args.out / "report.html").write_text(render_html(document))
            print(f"report: {args.out / 'report.html'} (report.json beside it)")
    except CallFailed as exc:
        print(f"convoy rollout {args.verb}: {exc} (HTTP {exc.status})", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"convoy rollout {args.verb}: {reason}", file=sys.stderr)
        return 2
    return 0
