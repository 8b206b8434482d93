"""What the terminal shows: a live progress line per step, the steps table, and the progress of
`convoy tune`."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .capacity import Recommendation, StepRow
from .report import TABLE_COLUMNS
from .stats import LatencyHistogram, RequestRecorder


class LiveProgress:
    """One progress bar per step, its text showing requests so far and the live p99."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = None

    def __enter__(self) -> LiveProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.__exit__(*exc_info)

    def step_started(self, step: int, users: int, label: str | None = None) -> None:
        self._task = self._progress.add_task(
            label or f"step {step}: {users} users", total=1.0, status="warming up"
        )

    def tick(self, recorder: RequestRecorder, fraction: float) -> None:
        if self._task is None:
            return
        total = recorder.total
        status = "warming up"
        if recorder.window_open or fraction >= 1.0:
            p99 = _p99(total.latency)
            status = (
                f"{total.requests:>7} req  {total.ok / recorder.elapsed_s:>8,.0f}/s  p99 {p99}"
                f"  failed {total.requests - total.ok}"
            )
        self._progress.update(self._task, completed=fraction, status=status)

    def step_done(self, row: StepRow) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=1.0)


def _p99(latency: LatencyHistogram) -> str:
    value = latency.percentile(99)
    return "n/a" if value is None else f"{value:.2f} ms"


def _cell(value, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def steps_table(rows: list[StepRow], recommendation: Recommendation, title: str) -> Table:
    table = Table(title=title)
    for column, _, _ in TABLE_COLUMNS:
        table.add_column(column, justify="right")
    for row in rows:
        style = (
            "bold green" if row.step == recommendation.best_step else ("" if row.meets_slo else "red")
        )
        table.add_row(
            *(_cell(getattr(row, attr), digits) for _, attr, digits in TABLE_COLUMNS), style=style
        )
    return table


class TuneLiveProgress:
    """`convoy tune`: a bar for the time budget, a bar for the ramp level being measured, and one
    printed line per finished candidate."""

    def __init__(self, console: Console, budget_s: float, most_candidates: int) -> None:
        self._console = console
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._budget_s = budget_s
        self._most = most_candidates
        self._started = time.monotonic()
        self._budget = None
        self._level = None
        self._heading = ""

    def __enter__(self) -> TuneLiveProgress:
        self._progress.__enter__()
        self._budget = self._progress.add_task("budget", total=self._budget_s, status="")
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.__exit__(*exc_info)

    def candidate_started(self, index: int, phase: str, candidate, left_s: float) -> None:
        self._heading = f"#{index}/<={self._most} {phase}: {candidate.label}"
        self._update_budget()
        if self._level is not None:
            self._progress.remove_task(self._level)
        self._level = self._progress.add_task(self._heading, total=1.0, status="loading")

    def level_started(self, users: int) -> None:
        if self._level is not None:
            self._progress.update(
                self._level, description=f"{self._heading}, {users} users", completed=0.0
            )

    def tick(self, recorder: RequestRecorder, fraction: float) -> None:
        self._update_budget()
        if self._level is None:
            return
        total = recorder.total
        status = "warming up"
        if recorder.window_open or fraction >= 1.0:
            status = (
                f"{total.ok / recorder.elapsed_s:>8,.0f}/s  p99 {_p99(total.latency)}"
                f"  failed {total.requests - total.ok}"
            )
        self._progress.update(self._level, completed=fraction, status=status)

    def candidate_done(self, trial) -> None:
        self._update_budget()
        if trial.error is not None:
            text = f"not measured: {trial.error}"
        elif trial.point is None:
            text = "no successful requests"
        else:
            verdict = "within the objective" if trial.meets_slo else "over the objective"
            text = (
                f"{trial.throughput_rps:,.0f} req/s at p99 {trial.p99_ms or 0:.2f} ms with "
                f"{trial.point.users} users: {verdict}"
            )
        self._progress.console.print(f"{self._heading}: {text}", markup=False)

    def _update_budget(self) -> None:
        if self._budget is None:
            return
        used = time.monotonic() - self._started
        left = max(0.0, self._budget_s - used)
        self._progress.update(
            self._budget, completed=min(used, self._budget_s), status=f"{left:,.0f} s left"
        )
