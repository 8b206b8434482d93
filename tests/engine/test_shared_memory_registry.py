"""The shared-memory registry on its own: bounds, truncation, keys, leases (real /dev/shm
segments)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from convoy.engine.shared_memory import SharedMemoryRef, SharedMemoryRegistry
from convoy.errors import AlreadyExists, InvalidInput, RegionNotFound


@pytest.fixture
def segment():
    key = f"/convoy_unit_{uuid.uuid4().hex}"
    path = f"/dev/shm{key}"
    with open(path, "wb") as handle:
        handle.write(bytes(range(256)) * 4)  # 1024 bytes
    registry = SharedMemoryRegistry()
    try:
        yield registry, key, path
    finally:
        registry.close()
        if os.path.exists(path):
            os.unlink(path)


def _read(registry, ref, what="input 'x'") -> bytes:
    lease = registry.lease(ref, what)
    try:
        return lease.read(what)
    finally:
        lease.release()


def _write(registry, ref, data, what="output 'y'") -> None:
    lease = registry.lease(ref, what)
    try:
        lease.write(data, what)
    finally:
        lease.release()


def test_read_honours_the_region_offset_and_the_reference_offset(segment):
    registry, key, _ = segment
    registry.register("r", key, 256, 512)
    assert _read(registry, SharedMemoryRef("r", 4, 2)) == bytes([2, 3, 4, 5])


def test_references_past_the_region_are_refused_even_inside_the_segment(segment):
    registry, key, _ = segment
    registry.register("r", key, 0, 100)
    with pytest.raises(
        InvalidInput, match=r"^Invalid offset \+ byte size for shared memory region: 'r'"
    ):
        _read(registry, SharedMemoryRef("r", 8, 96))
    with pytest.raises(InvalidInput, match=r"^Invalid offset for shared memory region: 'r'"):
        _write(registry, SharedMemoryRef("r", 0, 100), b"")
    with pytest.raises(RegionNotFound, match=r"^Unable to find shared memory region: 'q'"):
        _read(registry, SharedMemoryRef("q", 1, 0))


def test_an_output_bigger_than_its_byte_size_writes_nothing(segment):
    registry, key, path = segment
    registry.register("r", key, 0, 1024)
    before = Path(path).read_bytes()
    with pytest.raises(InvalidInput, match="nothing was written"):
        _write(registry, SharedMemoryRef("r", 4, 0), b"too long")
    assert Path(path).read_bytes() == before
    _write(registry, SharedMemoryRef("r", 8, 16), b"12345678")
    assert Path(path).read_bytes()[16:24] == b"12345678"


def test_a_truncated_segment_is_an_error_and_is_never_extended(segment):
    registry, key, path = segment
    registry.register("r", key, 0, 1024)
    os.truncate(path, 10)
    with pytest.raises(InvalidInput, match="smaller than when it was registered"):
        _read(registry, SharedMemoryRef("r", 16, 0))
    with pytest.raises(InvalidInput, match="smaller than when it was registered"):
        _write(registry, SharedMemoryRef("r", 16, 0), b"x" * 16)
    assert os.path.getsize(path) == 10
    assert _read(registry, SharedMemoryRef("r", 10, 0)) == bytes(range(10))


def test_an_unlinked_segment_still_reads_what_it_held(segment):
    registry, key, path = segment
    registry.register("r", key, 0, 1024)
    os.unlink(path)
    assert _read(registry, SharedMemoryRef("r", 3, 5)) == bytes([5, 6, 7])


@pytest.mark.parametrize("key", ["/a/b", "/..", "../x", "/dev/shm/x"])
def test_keys_that_are_not_posix_shm_names_are_refused(segment, key):
    registry, _, _ = segment
    with pytest.raises(
        InvalidInput, match=rf"^Unable to open shared memory region: '{key}'.*not a POSIX"
    ):
        registry.register("r", key, 0, 1)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("", "cannot register shared memory region 'r' - invalid shm key ''"),
        ("///", "cannot register shared memory region 'r' - invalid shm key '///'"),
        (
            "//triton_python_backend_shm_region_x",
            "cannot register shared memory region 'r' with key '//triton_python_backend_shm_region_x' "
            "as the key contains the reserved prefix 'triton_python_backend_shm_region_'",
        ),
        ("/no_such_segment_here", "Unable to open shared memory region: '/no_such_segment_here'"),
    ],
)
def test_register_refusals_are_in_tritons_words(segment, key, expected):
    registry, _, _ = segment
    with pytest.raises(InvalidInput) as raised:
        registry.register("r", key, 0, 1)
    assert str(raised.value).startswith(expected)


def test_register_bounds_and_a_second_registration_are_refused_in_tritons_words(segment):
    registry, key, _ = segment
    for offset, size in ((0, 1025), (1, 1024), (1024, 1), (1025, 0)):
        with pytest.raises(
            InvalidInput, match=r"^failed to register shared memory region 'r': invalid args"
        ):
            registry.register("r", key, offset, size)
    registry.register("r", key, 0, 1024)
    with pytest.raises(AlreadyExists, match=r"^shared memory region 'r' already in manager$"):
        registry.register("r", key, 0, 8)


def test_a_region_unregistered_while_leased_stays_until_the_lease_ends(segment):
    registry, key, _ = segment
    registry.register("r", key, 0, 1024)
    lease = registry.lease(SharedMemoryRef("r", 4, 8), "output 'y'")
    registry.unregister("r")
    assert [row["name"] for row in registry.status()] == ["r"]  # still in use: still listed
    with pytest.raises(AlreadyExists):
        registry.register("r", key, 0, 8)
    lease.write(b"late", "output 'y'")
    lease.release()
    assert registry.status() == []
    registry.register("r", key, 0, 8)  # the name is free again


def test_a_mirror_drops_a_region_at_once_but_its_leases_keep_the_segment(segment):
    registry, key, _ = segment
    registry.register("r", key, 0, 1024)
    lease = registry.lease(SharedMemoryRef("r", 4, 0), "input 'x'")
    registry.mirror([{"name": "r", "key": key, "offset": 512, "byte_size": 512}])  # replaced
    assert registry.status("r") == [{"name": "r", "key": key, "offset": 512, "byte_size": 512}]
    assert lease.read("input 'x'") == bytes([0, 1, 2, 3])  # the old region's bytes
    lease.release()
    assert _read(registry, SharedMemoryRef("r", 4, 0)) == bytes([0, 1, 2, 3])  # 512 % 256 == 0


def test_status_and_idempotent_unregister(segment):
    registry, key, _ = segment
    registry.unregister()  # nothing registered: fine
    registry.register("a", key, 0, 10)
    registry.register("b", key, 10, 20)
    assert [r["name"] for r in registry.status()] == ["a", "b"]
    assert registry.status("b") == [{"name": "b", "key": key, "offset": 10, "byte_size": 20}]
    registry.unregister("a")
    registry.unregister("a")
    with pytest.raises(RegionNotFound, match=r"^Unable to find system shared memory region: 'a'$"):
        registry.status("a")
    registry.unregister()
    assert registry.status() == []
