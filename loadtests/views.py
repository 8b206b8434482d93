"""What the terminal shows: a live progress line per step, and the steps table."""

from __future__ import annotations

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
