"""The shared-memory registry on its own: bounds, truncation, keys (real /dev/shm segments)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from convoy.engine.shared_memory import SharedMemoryRef, SharedMemoryRegistry
from convoy.errors import InvalidInput, ModelNotFound


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


def test_read_honours_the_region_offset_and_the_reference_offset(segment):
    registry, key, _ = segment
    registry.register("r", key, 256, 512)
    assert registry.read(SharedMemoryRef("r", 4, 2), "input 'x'") == bytes([2, 3, 4, 5])


def test_references_past_the_region_are_refused_even_inside_the_segment(segment):
    registry, key, _ = segment
    registry.register("r", key, 0, 100)
    with pytest.raises(InvalidInput, match="exceeds the 100 bytes of region 'r'"):
        registry.read(SharedMemoryRef("r", 8, 96), "input 'x'")
    with pytest.raises(InvalidInput, match="exceeds"):
        registry.write(SharedMemoryRef("r", 8, 96), b"12345678", "output 'y'")


def test_an_output_bigger_than_its_byte_size_writes_nothing(segment):
    registry, key, path = segment
    registry.register("r", key, 0, 1024)
    before = Path(path).read_bytes()
    with pytest.raises(InvalidInput, match="nothing was written"):
        registry.write(SharedMemoryRef("r", 4, 0), b"too long", "output 'y'")
    assert Path(path).read_bytes() == before
    registry.write(SharedMemoryRef("r", 8, 16), b"12345678", "output 'y'")
    assert Path(path).read_bytes()[16:24] == b"12345678"


def test_a_truncated_segment_is_an_error_and_is_never_extended(segment):
    registry, key, path = segment
    registry.register("r", key, 0, 1024)
    os.truncate(path, 10)
    with pytest.raises(InvalidInput, match="smaller than when it was registered"):
        registry.read(SharedMemoryRef("r", 16, 0), "input 'x'")
    with pytest.raises(InvalidInput, match="smaller than when it was registered"):
        registry.write(SharedMemoryRef("r", 16, 0), b"x" * 16, "output 'y'")
    assert os.path.getsize(path) == 10
    assert registry.read(SharedMemoryRef("r", 10, 0), "input 'x'") == bytes(range(10))


def test_an_unlinked_segment_still_reads_what_it_held(segment):
    registry, key, path = segment
    registry.register("r", key, 0, 1024)
    os.unlink(path)
    assert registry.read(SharedMemoryRef("r", 3, 5), "input 'x'") == bytes([5, 6, 7])


@pytest.mark.parametrize("key", ["", "/a/b", "/..", "../x", "/dev/shm/x"])
def test_keys_that_are_not_posix_shm_names_are_refused(segment, key):
    registry, _, _ = segment
    with pytest.raises(InvalidInput, match="not a POSIX shared memory name"):
        registry.register("r", key, 0, 1)


def test_status_and_idempotent_unregister(segment):
    registry, key, _ = segment
    registry.unregister()  # nothing registered: fine
    registry.register("a", key, 0, 10)
    registry.register("b", key, 10, 20)
    assert [r["name"] for r in registry.status()] == ["a", "b"]
    assert registry.status("b") == [{"name": "b", "key": key, "offset": 10, "byte_size": 20}]
    registry.unregister("a")
    registry.unregister("a")
    with pytest.raises(ModelNotFound):
        registry.status("a")
    registry.unregister()
    assert registry.status() == []
