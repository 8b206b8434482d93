"""`convoy soak`: a bounded load held for a long time, watching the server for drift.

The run is a series of equal windows, each one `run_load` step (the same checked locust users
as `convoy loadtest`). Before the first window, after each window and after the last, the
server's resident memory is sampled: from /proc (via psutil) when its pid is known, counting
its worker processes; otherwise from `process_resident_memory_bytes` on its metrics endpoint.
The report gives idle RSS before and after, RSS and latency per window, least-squares slopes
(MB/hour, ms/hour) and the last-to-first latency ratios, as JSON and Markdown.

Only `drift` and the report writers live here without locust, so they run in any process.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

#: Windows a fit leaves out at the start (allocator and connection warm-up is not a leak).
WARMUP_WINDOWS = 1


@dataclass(frozen=True)
class WindowRow:
    """One window of the run: the client's numbers and the server's memory after it."""

    index: int
    #: Seconds since the first window started, at this window's middle.
    at_s: float
    requests: int
    successes: int
    errors: int
    rejections: int
    mismatches: int
    throughput_rps: float
    p50_ms: float | None
    p99_ms: float | None
    rss_mb: float | None
    #: Highest RSS seen while the window ran.
    rss_peak_mb: float | None


@dataclass(frozen=True)
class Drift:
    """How the windows moved: slopes by least squares over the windows after the warm-up ones."""

    rss_idle_before_mb: float | None
    rss_idle_after_mb: float | None
    #: Last window's RSS minus the idle RSS before the load.
    rss_growth_mb: float | None
    rss_slope_mb_per_hour: float | None
    #: The slope over the second half of the windows only: a leak keeps climbing there, while
    #: warm-up growth (allocator arenas, connections, caches) has levelled off.
    rss_slope_last_half_mb_per_hour: float | None
    p50_slope_ms_per_hour: float | None
    p99_slope_ms_per_hour: float | None
    #: Last window's percentile over the first's (1.0: no drift).
    p50_ratio: float | None
    p99_ratio: float | None
    windows_fitted: int


@dataclass
class SoakReport:
    target: dict
    plan: dict
    windows: list[WindowRow]
    drift: Drift
    thresholds: dict
    #: Which thresholds the run exceeded (empty: passed).
    exceeded: list[str] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, in value per hour; None under 2 points."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread * 3600.0


def drift(windows: list[WindowRow], idle_before: float | None, idle_after: float | None) -> Drift:
    fitted = windows[WARMUP_WINDOWS:] if len(windows) > WARMUP_WINDOWS + 1 else windows

    def fit(attribute: str, rows: list[WindowRow] = fitted) -> float | None:
        points = [(w.at_s, getattr(w, attribute)) for w in rows if getattr(w, attribute) is not None]
        return slope_per_hour(points)

    def ratio(attribute: str) -> float | None:
        values = [getattr(w, attribute) for w in windows if getattr(w, attribute)]
        return values[-1] / values[0] if len(values) >= 2 else None

    last_rss = next((w.rss_mb for w in reversed(windows) if w.rss_mb is not None), None)
    growth = last_rss - idle_before if last_rss is not None and idle_before is not None else None
    return Drift(
        rss_idle_before_mb=idle_before,
        rss_idle_after_mb=idle_after,
        rss_growth_mb=growth,
        rss_slope_mb_per_hour=fit("rss_mb"),
        rss_slope_last_half_mb_per_hour=fit("rss_mb", windows[len(windows) // 2 :]),
        p50_slope_ms_per_hour=fit("p50_ms"),
        p99_slope_ms_per_hour=fit("p99_ms"),
        p50_ratio=ratio("p50_ms"),
        p99_ratio=ratio("p99_ms"),
        windows_fitted=len(fitted),
    )


def exceeded(result: Drift, max_growth_mb: float | None, max_slope: float | None) -> list[str]:
    """The thresholds the run went past, as sentences (None: that threshold is not checked)."""
    found = []
    growth, slope = result.rss_growth_mb, result.rss_slope_mb_per_hour
    if max_growth_mb is not None and growth is not None and growth > max_growth_mb:
        found.append(f"RSS grew {growth:.1f} MB (limit {max_growth_mb:g} MB)")
    if max_slope is not None and slope is not None and slope > max_slope:
        found.append(
            f"RSS slope {result.rss_slope_mb_per_hour:.1f} MB/hour (limit {max_slope:g} MB/hour)"
        )
    return found


# --- memory ----------------------------------------------------------------------------------------
class RssProbe:
    """The server's resident memory in MB: its process and its workers (by pid), else its
    `process_resident_memory_bytes` metric (the server's own process only)."""

    def __init__(self, pid: int | None, metrics_url: str | None) -> None:
        self._process = psutil.Process(pid) if pid else None
        self._metrics_url = metrics_url
        self.source = "proc" if pid else ("metrics" if metrics_url else "none")

    def sample(self) -> float | None:
        if self._process is not None:
            try:
                total = self._process.memory_info().rss
                for child in self._process.children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):  # a worker just exited
                        total += child.memory_info().rss
                return total / 2**20
            except psutil.NoSuchProcess:
                return None
        from .metrics import scrape

        snapshot = scrape(self._metrics_url)
        value = snapshot.total("process_resident_memory_bytes") if snapshot is not None else None
        return value / 2**20 if value is not None else None


# --- a server of our own -----------------------------------------------------------------------------
@dataclass
class StartedServer:
    """`convoy serve` started for the run (no URL given), every port chosen by the OS."""

    process: subprocess.Popen
    http_url: str
    grpc_url: str
    metrics_url: str

    @classmethod
    def start(cls, repository: Path, extra_args: list[str], log_dir: Path, deadline_s: float = 120.0):
        log_dir.mkdir(parents=True, exist_ok=True)
        out_path = log_dir / "server.out"
        with out_path.open("w") as out, (log_dir / "server.log").open("w") as err:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "convoy",
                    "serve",
                    "--model-repository",
                    str(repository),
                    "--host",
                    "127.0.0.1",
                    "--http-port",
                    "0",
                    "--grpc-port",
                    "0",
                    "--metrics-port",
                    "0",
                    *extra_args,
                ],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            for line in out_path.read_text().splitlines():
                if line.startswith("convoy: serving") and " http=" in line:
                    ports = dict(part.split("=", 1) for part in line.split() if "=" in part)
                    server = cls(
                        process,
                        f"127.0.0.1:{ports['http']}",
                        f"127.0.0.1:{ports['grpc']}",
                        f"http://127.0.0.1:{ports['metrics']}/metrics",
                    )
                    if server.wait_ready(end):
                        return server
            if process.poll() is not None:
                break
            time.sleep(0.1)
        process.kill()
        process.wait()
        raise RuntimeError(f"the server did not become ready (see {log_dir / 'server.log'})")

    def wait_ready(self, end: float) -> bool:
        import urllib.request

        while time.monotonic() < end and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2):
                    return True
            except OSError:
                time.sleep(0.1)
        return False

    def stop(self, timeout_s: float = 30.0) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


# --- the run -----------------------------------------------------------------------------------
class _PeakRss:
    """Samples the probe at most twice a second while a window runs (psutil reads /proc)."""

    def __init__(self, probe: RssProbe) -> None:
        self.probe = probe
        self.peak: float | None = None
        self._last = 0.0

    def take(self) -> float | None:
        rss = self.probe.sample()
        if rss is not None and (self.peak is None or rss > self.peak):
            self.peak = rss
        return rss

    def on_tick(self, _recorder, _fraction) -> None:
        now = time.monotonic()
        if now - self._last >= 0.5:
            self._last = now
            self.take()


def run_soak(
    target,
    protocols,
    users: int,
    duration_s: float,
    window_s: float,
    probe: RssProbe,
    max_requests_per_window: int,
    on_window=None,
) -> tuple[list[WindowRow], float | None, float | None, dict[str, int]]:
    """(windows, idle RSS before, idle RSS after, failure messages) of one soak run."""
    from .runner import LoadPlan, run_load  # imports locust: monkey-patches this process

    idle_before = probe.sample()
    count = max(1, math.ceil(duration_s / window_s))
    plan = LoadPlan(tuple(protocols), users, window_s, max_requests_per_window)
    windows: list[WindowRow] = []
    failures: dict[str, int] = {}
    started = time.monotonic()
    for index in range(count):
        sampler = _PeakRss(probe)
        window_start = time.monotonic() - started
        result = run_load(target, plan, None, on_tick=sampler.on_tick)
        rss = sampler.take()
        s = result.summary
        row = WindowRow(
            index=index,
            at_s=round((window_start + time.monotonic() - started) / 2, 3),
            requests=s.requests,
            successes=s.successes,
            errors=s.errors,
            rejections=s.rejections,
            mismatches=s.mismatches,
            throughput_rps=round(s.throughput_rps, 1),
            p50_ms=s.p50_ms,
            p99_ms=s.p99_ms,
            rss_mb=None if rss is None else round(rss, 2),
            rss_peak_mb=None if sampler.peak is None else round(sampler.peak, 2),
        )
        windows.append(row)
        for message, n in result.failure_messages.items():
            failures[message] = failures.get(message, 0) + n
        if on_window is not None:
            on_window(row, count)
    idle_after = probe.sample()
    return windows, idle_before, idle_after, failures


# --- the report --------------------------------------------------------------------------------
def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: SoakReport) -> str:
    d = report.drift
    lines = [
        f"# convoy soak: {report.target['model']}",
        "",
        f"{report.plan['windows']} windows of {report.plan['window_s']:g} s, "
        f"{report.plan['users']} users over {', '.join(report.plan['protocols'])}; "
        f"RSS from {report.target['rss_source']}.",
        "",
        "| window | at s | requests | ok | errors | rejected | mismatch | req/s | p50 ms | p99 ms "
        "| RSS MB | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in report.windows:
        lines.append(
            f"| {w.index} | {w.at_s:.1f} | {w.requests} | {w.successes} | {w.errors} | "
            f"{w.rejections} | {w.mismatches} | {w.throughput_rps:,.0f} | {_fmt(w.p50_ms)} | "
            f"{_fmt(w.p99_ms)} | {_fmt(w.rss_mb, 1)} | {_fmt(w.rss_peak_mb, 1)} |"
        )
    lines += [
        "",
        "| drift | value |",
        "|---|---|",
        f"| idle RSS before / after (MB) | {_fmt(d.rss_idle_before_mb, 1)} / "
        f"{_fmt(d.rss_idle_after_mb, 1)} |",
        f"| RSS growth, last window minus idle before (MB) | {_fmt(d.rss_growth_mb, 1)} |",
        f"| RSS slope (MB/hour, {d.windows_fitted} windows) | {_fmt(d.rss_slope_mb_per_hour, 1)} |",
        f"| RSS slope over the second half (MB/hour) | {_fmt(d.rss_slope_last_half_mb_per_hour, 1)} |",
        f"| p50 slope (ms/hour) / last ÷ first | {_fmt(d.p50_slope_ms_per_hour)} / "
        f"{_fmt(d.p50_ratio)} |",
        f"| p99 slope (ms/hour) / last ÷ first | {_fmt(d.p99_slope_ms_per_hour)} / "
        f"{_fmt(d.p99_ratio)} |",
        "",
        "Result: " + ("; ".join(report.exceeded) if report.exceeded else "within the thresholds"),
        "",
    ]
    return "\n".join(lines)


def write_report(report: SoakReport, folder: Path) -> dict[str, Path]:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "soak.json", "markdown": folder / "soak.md"}
    data = asdict(report)
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["markdown"].write_text(markdown(report))
    return paths
