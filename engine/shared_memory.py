"""Triton's system shared-memory extension: named regions of POSIX shared-memory segments that
clients register, then name in a request instead of sending tensor bytes.

One registry per server (the InferenceService holds it). A region keeps the segment's file
descriptor open, never a mapping: inputs are read with pread and outputs written with pwrite
after checking the segment's current size with fstat. A client that truncates or removes its
segment therefore cannot crash the server (reading past the end of a truncated *mapping* raises
SIGBUS); the request fails with a message naming the region instead. Every use is bounds-checked
against the registered region and the segment as it is now; an output that does not fit is an
error and nothing is written.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from convoy.errors import InvalidInput, ModelNotFound, NoDevice

#: Where POSIX shm_open keeps its segments on Linux.
SHM_ROOT = "/dev/shm"
#: A shm_open name: one optional leading '/', then no '/' at all.
_KEY = re.compile(r"^/?[^/\x00]+$")
#: Most regions one server holds at once (each keeps a file descriptor open).
MAX_REGIONS = 4096


@dataclass(frozen=True, slots=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int

    def as_dict(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


@dataclass(frozen=True, slots=True)
class SharedMemoryRef:
    """Where a request's tensor lives: `byte_size` bytes at `offset` into region `region`."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass(slots=True, eq=False)
class _Region:
    status: RegionStatus
    fd: int


class SharedMemoryRegistry:
    """Registered system shared-memory regions by name (event-loop thread only)."""

    def __init__(self) -> None:
        self._regions: dict[str, _Region] = {}

    # --- control --------------------------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidInput("shared memory region name must not be empty")
        if name in self._regions:
            raise InvalidInput(
                f"shared memory region '{name}' is already registered; unregister it first"
            )
        if len(self._regions) >= MAX_REGIONS:
            raise InvalidInput(f"at most {MAX_REGIONS} shared memory regions may be registered")
        if not isinstance(key, str) or not _KEY.match(key) or key.strip("/") in (".", ".."):
            raise InvalidInput(
                f"shared memory region '{name}': key '{key}' is not a POSIX shared memory name "
                "(expected '/name' without further '/')"
            )
        for field, value in (("offset", offset), ("byte_size", byte_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(
                    f"shared memory region '{name}': {field} must be a non-negative integer, "
                    f"got {value!r}"
                )
        path = os.path.join(SHM_ROOT, key.lstrip("/"))
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidInput(
                f"shared memory region '{name}': no shared memory segment with key '{key}'"
            ) from None
        except OSError as exc:
            raise InvalidInput(
                f"shared memory region '{name}': cannot open key '{key}': {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"shared memory region '{name}': key '{key}' is not a segment")
            if offset + byte_size > info.st_size:
                raise InvalidInput(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                    f"exceeds the {info.st_size} bytes of segment '{key}'"
                )
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = _Region(RegionStatus(name, key, offset, byte_size), fd)

    def unregister(self, name: str = "") -> None:
        """Unregister one region, or every region when `name` is empty. A name that is not
        registered is not an error (as in Triton: unregistering is idempotent)."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                os.close(region.fd)

    def status(self, name: str = "") -> list[dict]:
        if name:
            region = self._regions.get(name)
            if region is None:
                raise ModelNotFound(f"no system shared memory region named '{name}' is registered")
            return [region.status.as_dict()]
        return [self._regions[n].status.as_dict() for n in sorted(self._regions)]

    def close(self) -> None:
        self.unregister()

    def mirror(self, regions: list[dict]) -> list[str]:
        """Make this registry hold exactly `regions` (status rows of the registry that owns
        them: a --workers front end follows the engine's). Returns the problems met (a segment
        gone since the owner registered it), one line per region not mirrored."""
        wanted = {row["name"]: RegionStatus(**row) for row in regions}
        for name in [n for n, r in self._regions.items() if wanted.get(n) != r.status]:
            self.unregister(name)
        problems = []
        for name, status in wanted.items():
            if name not in self._regions:
                try:
                    self.register(name, status.key, status.offset, status.byte_size)
                except InvalidInput as exc:
                    problems.append(str(exc))
        return problems

    # --- data -------------------------------------------------------------------------------------
    def check(self, ref: SharedMemoryRef, what: str) -> RegionStatus:
        """The region `ref` names, with `ref` inside its registered bounds."""
        region = self._regions.get(ref.region)
        if region is None:
            raise InvalidInput(
                f"{what}: no system shared memory region named '{ref.region}' is registered"
            )
        status = region.status
        if ref.offset + ref.byte_size > status.byte_size:
            raise InvalidInput(
                f"{what}: shared_memory_offset {ref.offset} + shared_memory_byte_size "
                f"{ref.byte_size} exceeds the {status.byte_size} bytes of region '{ref.region}'"
            )
        return status

    def read(self, ref: SharedMemoryRef, what: str) -> bytes:
        """A copy of the `ref.byte_size` bytes `ref` names."""
        self.check(ref, what)
        region = self._regions[ref.region]
        start = self._checked_start(region, ref, ref.byte_size, what)
        data = os.pread(region.fd, ref.byte_size, start)
        if len(data) != ref.byte_size:  # shrunk between fstat and pread
            raise self._shrunk(region, ref, what)
        return data

    def write(self, ref: SharedMemoryRef, data, what: str) -> None:
        """Write `data` where `ref` points; refused whole when it does not fit."""
        self.check(ref, what)
        size = memoryview(data).nbytes
        if size > ref.byte_size:
            raise InvalidInput(
                f"{what}: the output holds {size} bytes but shared_memory_byte_size is "
                f"{ref.byte_size} (region '{ref.region}'); nothing was written"
            )
        region = self._regions[ref.region]
        start = self._checked_start(region, ref, size, what)
        written = os.pwrite(region.fd, data, start)
        if written != size:
            raise InvalidInput(f"{what}: wrote {written} of {size} bytes to region '{ref.region}'")

    @staticmethod
    def _checked_start(region: _Region, ref: SharedMemoryRef, size: int, what: str) -> int:
        """Absolute file offset of `ref`, after checking the segment still holds `size` bytes
        there (the client may have truncated it since it registered)."""
        start = region.status.offset + ref.offset
        if os.fstat(region.fd).st_size < start + size:
            raise SharedMemoryRegistry._shrunk(region, ref, what)
        return start

    @staticmethod
    def _shrunk(region: _Region, ref: SharedMemoryRef, what: str) -> InvalidInput:
        return InvalidInput(
            f"{what}: shared memory segment '{region.status.key}' of region '{ref.region}' is "
            "smaller than when it was registered (truncated by its owner?)"
        )


def cuda_shared_memory_unavailable(reason: str) -> NoDevice:
    return NoDevice(f"CUDA shared memory is unavailable: {reason}")
