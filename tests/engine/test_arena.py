"""The front end's shared-memory arena (engine/arena.py): blocks never overlap while live, the
bytes read back are the bytes placed, freed space comes back, and a full arena says so (the
tensor then travels in the frame)."""

from __future__ import annotations

import io
import itertools
import os

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convoy.engine.arena import Arena, open_arena
from convoy.wire import FrameWriter, TensorMeta, read_tensors, receive_frame

SIZE = 1 << 16


@pytest.fixture
def arena():
    made = Arena(SIZE, threshold=1)
    yield made
    made.close()


class Carrier(msgspec.Struct, tag="carrier", array_like=True):
    inputs: list[TensorMeta]


def test_the_engine_reads_placed_tensors_in_place_and_small_ones_stay_in_the_frame():
    arena = Arena(SIZE, threshold=1024)
    try:
        shared = open_arena(arena.name, arena.size)
        big = np.arange(1024, dtype=np.float32).reshape(2, 512)
        small = np.arange(4, dtype=np.int64)
        writer = FrameWriter()
        metas = writer.tensors({"big": big, "small": small}, arena)
        assert [m.shared for m in metas] == [True, False]
        writer.add(Carrier(metas))
        frame = io.BytesIO(b"".join(bytes(part) for part in writer.take()))
        (message,), data = receive_frame(frame, Carrier)
        got = read_tensors(message.inputs, data, shared)
        assert np.array_equal(got["big"], big) and got["big"].shape == (2, 512)
        assert not got["big"].flags.writeable
        assert np.array_equal(got["small"], small)
        assert len(data) == small.nbytes  # the big tensor's bytes are not in the frame
        placed = arena.take_placed()
        assert placed is not None and arena.in_use == 1
        arena.free(placed)
        assert arena.in_use == 0
    finally:
        arena.close()


def test_a_shared_tensor_without_the_arena_is_refused():
    arena = Arena(SIZE, threshold=1)
    try:
        metas = FrameWriter().tensors({"x": np.ones(8, np.float32)}, arena)
        with pytest.raises(Exception, match="not in the sender's arena"):
            read_tensors(metas, memoryview(b""), None)
    finally:
        arena.close()


def test_a_full_arena_places_nothing_until_space_is_freed(arena):
    block = np.ones(SIZE // 2, np.uint8)
    assert arena.place(block) == 0
    assert arena.place(block) == SIZE // 2
    first, second = arena.take_placed()
    assert arena.place(np.ones(1, np.uint8)) is None
    arena.free([second])  # the newer block: space comes back only behind the oldest
    assert arena.place(np.ones(SIZE // 2, np.uint8)) is None
    arena.free([first])
    assert arena.place(np.ones(SIZE, np.uint8)) == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, SIZE // 3), st.integers(0, 3)),
        min_size=1,
        max_size=80,
    )
)
def test_live_blocks_never_overlap_and_keep_their_bytes(steps):
    arena = Arena(SIZE, threshold=1)
    shared = open_arena(arena.name, arena.size)
    try:
        live: list[tuple[list, int, np.ndarray]] = []
        for index, (size, frees) in enumerate(steps):
            array = np.full(size, index % 251, np.uint8)
            offset = arena.place(array)
            placed = arena.take_placed()
            if offset is None:
                assert placed is None
            else:
                live.append((placed, offset, array))
            for _ in range(min(frees, len(live))):
                # Free in an order other than allocation order: the middle one first.
                gone = live.pop(len(live) // 2)
                arena.free(gone[0])
            spans = sorted((offset, offset + array.nbytes) for _, offset, array in live)
            for (_, end), (start, _) in itertools.pairwise(spans):
                assert end <= start, "two live blocks overlap"
            for _, offset, array in live:
                seen = np.frombuffer(shared, np.uint8, array.nbytes, offset)
                assert np.array_equal(seen, array)
        for placed, _, _ in live:
            arena.free(placed)
        assert arena.in_use == 0
        assert arena.place(np.ones(SIZE, np.uint8)) == 0  # everything came back
    finally:
        arena.close()


def test_an_arena_larger_than_shared_memory_allows_is_halved_until_it_fits(monkeypatch):
    """posix_fallocate reserves the pages at once: a short /dev/shm fails at creation (and the
    arena shrinks), never with SIGBUS when a request touches an unbacked page."""
    real = os.posix_fallocate

    def short_shm(fd, offset, length):
        if length > 8 << 20:
            raise OSError(28, "No space left on device")
        real(fd, offset, length)

    def no_shm(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", short_shm)
    arena = Arena.create(64 << 20)
    try:
        assert arena is not None and arena.size == 8 << 20
    finally:
        arena.close()
    monkeypatch.setattr(os, "posix_fallocate", no_shm)
    assert Arena.create(64 << 20) is None
    mine = f"convoy-ipc-{os.getpid()}-"
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(mine)]
