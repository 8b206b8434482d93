"""Large input tensors from a --workers front end to the engine through shared memory.

Over the socket pair a tensor is copied twice more than it must be: into the kernel by the front
end, out of it by the engine. For a 600 KB image that is ~80 µs of the engine's one core per
request, which is what caps an engine process (bench/workers.py). So each front end owns an
arena, a file in /dev/shm both processes map: a tensor of `SHARED_FROM_BYTES` or more is copied
into it once by the front end, and the engine reads it in place (read-only numpy views), the
same way it reads tensors in a frame. The engine's answer to a request (its Result or Failure)
is the sign it no longer reads the request's inputs: the front end then frees them.

The arena is a ring: blocks are taken at its head and freed in any order; the space of a freed
block comes back once every block older than it is freed too. A request that holds its block
long (a slow model) keeps the space behind it until then; meanwhile a tensor that does not fit
travels in the frame as before. Shared memory is an optimisation, never a condition.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
from collections import deque

import numpy as np

log = logging.getLogger("convoy.engine.arena")

#: Tensors this large or larger go through the arena (smaller ones cost less in the frame).
SHARED_FROM_BYTES = 64 * 1024
#: No arena smaller than this (halving the asked size until /dev/shm has room).
_SMALLEST = 4 << 20
#: Blocks start on cache-line boundaries.
_ALIGN = 64
_DIRECTORY = "/dev/shm"
#: One block: [start, end, live], a list so that `free()` can mark it in place.
Block = list[int]


class Arena:
    """The front end's side: where it places large inputs, and frees them when answered."""

    def __init__(self, size: int, threshold: int = SHARED_FROM_BYTES) -> None:
        self.size = size
        #: Tensors of this many bytes or more are placed here.
        self.threshold = threshold
        self.name = f"convoy-ipc-{os.getpid()}-{secrets.token_hex(4)}"
        self._path = os.path.join(_DIRECTORY, self.name)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserved now, not on first touch: a /dev/shm too small for it (a container's
            # 64 MB default shared by many front ends) fails here, not with SIGBUS mid-request.
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(self._path)
            raise
        finally:
            os.close(fd)
        #: Live and freed blocks in the order they were taken: [start, end, live].
        self._blocks: deque[Block] = deque()
        self._head = 0
        #: Blocks taken since the last `take_placed()` (one request's tensors).
        self._placed: list[Block] = []
        self.placed_bytes = 0

    @classmethod
    def create(cls, size: int) -> Arena | None:
        """An arena of `size` bytes, or None when shared memory is unavailable (logged)."""
        if size <= 0:
            return None
        wanted, problem = size, None
        while True:
            try:
                arena = cls(size)
            except OSError as exc:
                problem = exc
                if size // 2 < min(_SMALLEST, wanted):
                    log.warning("no shared memory for large tensors (%s): frames carry them", problem)
                    return None
                size //= 2
                continue
            if size < wanted:
                log.warning(
                    "shared-memory arena for large tensors: %d MiB of the %d MiB asked for "
                    "(/dev/shm is short: give the container more)",
                    size >> 20,
                    wanted >> 20,
                )
            return arena

    def place(self, array: np.ndarray) -> int | None:
        """Copy `array` into the arena; its offset, or None when there is no room."""
        nbytes = array.nbytes
        start = self._take((nbytes + _ALIGN - 1) & ~(_ALIGN - 1))
        if start is None:
            return None
        target = np.ndarray(array.shape, array.dtype, buffer=self._map, offset=start)
        np.copyto(target, array)
        self.placed_bytes += nbytes
        return start

    def take_placed(self) -> list[Block] | None:
        """The blocks placed since the last call (to free when their request is answered)."""
        placed, self._placed = self._placed, []
        return placed or None

    def _take(self, size: int) -> int | None:
        blocks = self._blocks
        if size > self.size:
            return None
        if not blocks:
            start = 0
        else:
            head, tail = self._head, blocks[0][0]
            if head > tail:  # live space is [tail, head): free at the end, then the start
                if self.size - head >= size:
                    start = head
                elif tail >= size:
                    start = 0
                else:
                    return None
            elif tail - head >= size:  # wrapped: free space is [head, tail)
                start = head
            else:
                return None
        block = [start, start + size, True]
        blocks.append(block)
        self._placed.append(block)
        self._head = start + size
        return start

    def free(self, placed: list[Block]) -> None:
        for block in placed:
            block[2] = False
        blocks = self._blocks
        while blocks and not blocks[0][2]:
            blocks.popleft()
        if not blocks:
            self._head = 0

    @property
    def in_use(self) -> int:
        """Blocks not yet freed (for tests and the shutdown check)."""
        return sum(1 for block in self._blocks if block[2])

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        with contextlib.suppress(BufferError):
            self._map.close()


def open_arena(name: str, size: int) -> memoryview:
    """The engine's side: map a front end's arena read-only, then remove its name (the mapping
    outlives it; nothing is left in /dev/shm if either process dies)."""
    if "/" in name or not name.startswith("convoy-ipc-"):
        raise ValueError(f"not an arena name: {name!r}")
    path = os.path.join(_DIRECTORY, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return memoryview(mapped)
