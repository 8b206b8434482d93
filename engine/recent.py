"""Recent traffic per model version, for the catalog's live figures.

The engine snapshots every version's request-latency histogram and failure count once a second
from the moment it starts, whether or not anyone looks; the catalog asks for the difference
between now and the oldest snapshot within the window. So the figures cover the traffic since
the server started (up to the window), through one process or --workers alike, and a page view
costs one diff rather than starting the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

#: (failures, success latency bucket counts) of one version at one moment.
Counts = tuple[int, list[int]]

#: Snapshots closer together than this give no rate (too little time to divide by).
MIN_SPAN_S = 0.5


class RecentWindow:
    """Snapshots of `read()` (version key -> Counts) every `step_s`, kept for `window_s`."""

    def __init__(
        self, read: Callable[[], dict[str, Counts]], window_s: float = 60.0, step_s: float = 1.0
    ) -> None:
        self._read = read
        self.window_s = window_s
        self.step_s = step_s
        #: (monotonic s, version key -> Counts), oldest first; bounded by the window.
        self._snapshots: deque[tuple[float, dict[str, Counts]]] = deque(
            maxlen=int(window_s / step_s) + 4
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """The first snapshot now (nothing counted yet), then one every `step_s` on the loop."""
        self.take()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="convoy-recent")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            self.take()

    def take(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        snapshots = self._snapshots
        # Keep the newest snapshot at least window_s old: the window's far end.
        while len(snapshots) > 1 and now - snapshots[1][0] >= self.window_s:
            snapshots.popleft()
        snapshots.append((now, self._read()))

    def window(
        self, current: dict[str, Counts], now: float | None = None
    ) -> tuple[float, dict[str, Counts]]:
        """(seconds covered, version key -> Counts over them); ({}, 0) before MIN_SPAN_S. A
        version absent from the oldest snapshot (loaded since) counts from zero."""
        now = time.monotonic() if now is None else now
        if not self._snapshots:
            return 0.0, {}
        then, old = self._snapshots[0]
        span = now - then
        if span < MIN_SPAN_S:
            return 0.0, {}
        recent: dict[str, Counts] = {}
        for key, (failures, buckets) in current.items():
            old_failures, old_buckets = old.get(key, (0, [0] * len(buckets)))
            if (
                len(old_buckets) != len(buckets)
                or failures < old_failures
                or any(a < b for a, b in zip(buckets, old_buckets, strict=True))
            ):
                continue  # reloaded since with fresh counters: no honest difference
            recent[key] = (
                failures - old_failures,
                [a - b for a, b in zip(buckets, old_buckets, strict=True)],
            )
        return span, recent
