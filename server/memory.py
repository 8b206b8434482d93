"""Giving freed memory back to the operating system after rejected requests.

A rejected 96 MiB gRPC message is freed at once, but glibc keeps the pages of the many small
buffers gRPC received it in (per-thread malloc arenas): measured, four such messages left RSS
+170 MiB with no Python object alive, until `malloc_trim(0)` returned it all. So after a
rejected request the front end asks for a trim, at most once per interval, off the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time

log = logging.getLogger("convoy.server")

#: Seconds between two trims, and the delay before one (the request's buffers must go first).
TRIM_INTERVAL_S = 1.0
TRIM_DELAY_S = 0.1


def _load_trim():
    """glibc's malloc_trim, or None (musl, macOS: nothing to do)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


class MemoryTrim:
    """Coalesced, rate-limited malloc_trim(0) on a thread."""

    def __init__(self) -> None:
        self._trim = _load_trim()
        self._last = float("-inf")
        self._scheduled = False

    def soon(self) -> None:
        """Trim shortly (call on the loop); a no-op while one is due or ran within the interval."""
        if self._trim is None or self._scheduled:
            return
        delay = max(TRIM_DELAY_S, self._last + TRIM_INTERVAL_S - time.monotonic())
        self._scheduled = True
        asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self._last = time.monotonic()
        future = asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
        future.add_done_callback(self._done)

    def _done(self, future) -> None:
        self._scheduled = False
        if not future.cancelled() and future.exception() is not None:
            log.debug("malloc_trim failed: %s", future.exception())
