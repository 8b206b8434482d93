"""Triton's system shared-memory extension: named regions of POSIX shared-memory segments that
clients register, then name in a request instead of sending tensor bytes.

One registry per process that decodes requests (the engine's, and each --workers front end's
copy). A region keeps the segment's file descriptor open, never a mapping: inputs are read with
pread and outputs written with pwrite after checking the segment's current size with fstat. A
client that truncates or removes its segment therefore cannot crash the server (reading past the
end of a truncated *mapping* raises SIGBUS); the request fails with a message naming the region
instead. Every use is bounds-checked against the registered region and the segment as it is now;
an output that does not fit is an error and nothing is written.

A request holds a lease on each region it names from decoding to its answer: a region
unregistered meanwhile stays (and is listed) until its last lease ends, as in Triton. Messages
are Triton's words (its tests match them), with Convoy's detail after them.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from typing import TypedDict

from convoy.errors import AlreadyExists, InvalidInput, NoDevice, RegionNotFound

#: Where POSIX shm_open keeps its segments on Linux.
SHM_ROOT = "/dev/shm"
#: Most regions one server holds at once (each keeps a file descriptor open).
MAX_REGIONS = 4096
#: Keys Triton keeps for its python backend's own regions (refused from clients, as Triton does).
RESERVED_PREFIX = "triton_python_backend_shm_region_"


class RegionRow(TypedDict):
    """A region's status as the extension lists it (and a --workers copy mirrors it)."""

    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True, slots=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int

    def as_dict(self) -> RegionRow:
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
    #: Requests holding a lease on it.
    users: int = 0
    #: Unregistered while in use: removed (and closed) when the last lease ends.
    unregistering: bool = False
    #: No longer in the registry (a --workers copy dropped it): closed when the last lease ends.
    retired: bool = False


class SharedMemoryLease:
    """One request's hold on a region: reads and writes go to the segment it was granted even
    if the region is unregistered meanwhile. `release` once, when the request is answered."""

    __slots__ = ("_region", "_registry", "ref")

    def __init__(self, registry: SharedMemoryRegistry, region: _Region, ref: SharedMemoryRef) -> None:
        self._registry = registry
        self._region: _Region | None = region
        self.ref = ref

    def read(self, what: str) -> bytes:
        """A copy of the `ref.byte_size` bytes the lease's ref names."""
        region, ref = self._region, self.ref
        assert region is not None  # a lease is read before its request is answered and released
        start = _checked_start(region, ref, ref.byte_size, what)
        data = os.pread(region.fd, ref.byte_size, start)
        if len(data) != ref.byte_size:  # shrunk between fstat and pread
            raise _shrunk(region, ref, what)
        return data

    def write(self, data: bytes | bytearray | memoryview, what: str) -> None:
        """Write `data` where the ref points; refused whole when it does not fit."""
        region, ref = self._region, self.ref
        assert region is not None  # outputs are written before the request is answered and released
        size = memoryview(data).nbytes
        if size > ref.byte_size:
            raise InvalidInput(
                f"{what}: the output holds {size} bytes but shared_memory_byte_size is "
                f"{ref.byte_size} (region '{ref.region}'); nothing was written"
            )
        start = _checked_start(region, ref, size, what)
        written = os.pwrite(region.fd, data, start)
        if written != size:
            raise InvalidInput(f"{what}: wrote {written} of {size} bytes to region '{ref.region}'")

    def release(self) -> None:
        if self._region is not None:
            self._registry._release(self._region)
            self._region = None


class SharedMemoryRegistry:
    """Registered system shared-memory regions by name. Control calls run on the event loop;
    leases may be taken on a decode thread too, so the table is guarded by a lock."""

    def __init__(self) -> None:
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    # --- control --------------------------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidInput("shared memory region name must not be empty")
        if not isinstance(key, str):
            raise InvalidInput(f"shared memory region '{name}': key must be a string")
        stripped = key.lstrip("/")
        if not stripped:
            raise InvalidInput(
                f"cannot register shared memory region '{name}' - invalid shm key '{key}'"
            )
        if stripped.startswith(RESERVED_PREFIX):
            raise InvalidInput(
                f"cannot register shared memory region '{name}' with key '{key}' as the key "
                f"contains the reserved prefix '{RESERVED_PREFIX}'"
            )
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared memory region '{name}' already in manager")
            if len(self._regions) >= MAX_REGIONS:
                raise InvalidInput(f"at most {MAX_REGIONS} shared memory regions may be registered")
        for field, value in (("offset", offset), ("byte_size", byte_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(
                    f"shared memory region '{name}': {field} must be a non-negative integer, "
                    f"got {value!r}"
                )
        # shm_open's names: one component below /dev/shm (no further '/', no NUL, not . or ..).
        if "/" in stripped or "\x00" in stripped or stripped in (".", ".."):
            raise InvalidInput(
                f"Unable to open shared memory region: '{key}' (not a POSIX shared memory name: "
                "expected '/name' without further '/')"
            )
        path = os.path.join(SHM_ROOT, stripped)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidInput(
                f"Unable to open shared memory region: '{key}' (no shared memory segment has that key)"
            ) from None
        except OSError as exc:
            raise InvalidInput(
                f"Unable to open shared memory region: '{key}' ({exc.strerror})"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"Invalid shared memory region: '{key}' (not a segment)")
            if offset + byte_size > info.st_size:
                raise InvalidInput(
                    f"failed to register shared memory region '{name}': invalid args (offset "
                    f"{offset} + byte_size {byte_size} exceeds the {info.st_size} bytes of segment "
                    f"'{key}')"
                )
            with self._lock:
                if name in self._regions:  # registered meanwhile by a concurrent call
                    raise AlreadyExists(f"shared memory region '{name}' already in manager")
                self._regions[name] = _Region(RegionStatus(name, key, offset, byte_size), fd)
        except BaseException:
            os.close(fd)
            raise

    def unregister(self, name: str = "") -> None:
        """Unregister one region, or every region when `name` is empty. A name that is not
        registered is not an error (as in Triton: unregistering is idempotent). A region in
        use stays until the requests holding it are answered."""
        with self._lock:
            names = [name] if name else list(self._regions)
            closing = []
            for each in names:
                region = self._regions.get(each)
                if region is None:
                    continue
                if region.users:
                    region.unregistering = True
                else:
                    del self._regions[each]
                    closing.append(region.fd)
        for fd in closing:
            os.close(fd)

    def status(self, name: str = "") -> list[RegionRow]:
        with self._lock:
            if name:
                region = self._regions.get(name)
                if region is None:
                    raise RegionNotFound(f"Unable to find system shared memory region: '{name}'")
                return [region.status.as_dict()]
            return [self._regions[n].status.as_dict() for n in sorted(self._regions)]

    def close(self) -> None:
        self.unregister()

    def mirror(self, regions: list[RegionRow]) -> list[str]:
        """Make this registry hold exactly `regions` (status rows of the registry that owns
        them: a --workers front end follows the engine's). A region dropped here stays open
        for the requests holding it. Returns the problems met (a segment gone since the owner
        registered it), one line per region not mirrored."""
        wanted = {row["name"]: RegionStatus(**row) for row in regions}
        closing = []
        with self._lock:
            for name in [n for n, r in self._regions.items() if wanted.get(n) != r.status]:
                region = self._regions.pop(name)
                region.retired = True
                if not region.users:
                    closing.append(region.fd)
        for fd in closing:
            os.close(fd)
        problems = []
        for name, status in wanted.items():
            if name not in self._regions:
                try:
                    self.register(name, status.key, status.offset, status.byte_size)
                except InvalidInput as exc:
                    problems.append(str(exc))
        return problems

    # --- data -------------------------------------------------------------------------------------
    def lease(self, ref: SharedMemoryRef, what: str) -> SharedMemoryLease:
        """A hold on the region `ref` names, with `ref` inside its registered bounds."""
        with self._lock:
            region = self._regions.get(ref.region)
            if region is None:
                raise RegionNotFound(f"Unable to find shared memory region: '{ref.region}' ({what})")
            size = region.status.byte_size
            if ref.offset >= size:
                raise InvalidInput(
                    f"Invalid offset for shared memory region: '{ref.region}' ({what}: "
                    f"shared_memory_offset {ref.offset}, the region holds {size} bytes)"
                )
            if ref.offset + ref.byte_size > size:
                raise InvalidInput(
                    f"Invalid offset + byte size for shared memory region: '{ref.region}' ({what}: "
                    f"shared_memory_offset {ref.offset} + shared_memory_byte_size {ref.byte_size} "
                    f"exceeds the region's {size} bytes)"
                )
            region.users += 1
        return SharedMemoryLease(self, region, ref)

    def _release(self, region: _Region) -> None:
        with self._lock:
            region.users -= 1
            if region.users or not (region.unregistering or region.retired):
                return
            if region.unregistering and self._regions.get(region.status.name) is region:
                del self._regions[region.status.name]
        os.close(region.fd)


def _checked_start(region: _Region, ref: SharedMemoryRef, size: int, what: str) -> int:
    """Absolute file offset of `ref`, after checking the segment still holds `size` bytes
    there (the client may have truncated it since it registered)."""
    start = region.status.offset + ref.offset
    if os.fstat(region.fd).st_size < start + size:
        raise _shrunk(region, ref, what)
    return start


def _shrunk(region: _Region, ref: SharedMemoryRef, what: str) -> InvalidInput:
    return InvalidInput(
        f"{what}: shared memory segment '{region.status.key}' of region '{ref.region}' is "
        "smaller than when it was registered (truncated by its owner?)"
    )


def cuda_shared_memory_unavailable(reason: str) -> NoDevice:
    return NoDevice(f"CUDA shared memory is unavailable: {reason}")
