"""The local response cache store: byte budgets, TinyLFU admission, TTL, invalidation."""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from convoy.engine.cache_store import ENTRY_OVERHEAD, LocalStore, entry_from


def key(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=16).digest()


def entry(nbytes: int = 1024):
    return entry_from({"OUT": np.zeros(nbytes, dtype=np.uint8)}, None, cost_ns=1000)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_are_owned_read_only_copies():
    source = np.arange(4, dtype=np.float32)
    cached = entry_from({"OUT": source[None]}, None, 0)
    source[0] = 99
    assert cached.outputs["OUT"][0, 0] == 0
    assert not cached.outputs["OUT"].flags.writeable
    assert cached.nbytes == ENTRY_OVERHEAD + len("OUT") + 16


def test_the_global_budget_is_never_exceeded():
    one = entry(1000).nbytes
    store = LocalStore(size=3 * one)
    for i in range(10):
        for _ in range(i + 1):  # each newer key asked for more often: admitted
            store.get(key(str(i)))
        store.insert(key(str(i)), "m/1/r", entry(1000))
        assert store.bytes <= store.size
    assert store.counts["m/1/r"].entries == 3
    assert store.counts["m/1/r"].evictions == 7


def test_an_entry_larger_than_the_budget_is_refused_by_size():
    store = LocalStore(size=500)
    assert not store.insert(key("big"), "m/1/r", entry(1000))
    assert store.counts["m/1/r"].rejected_size == 1


def test_a_model_over_its_own_budget_evicts_only_its_own_entries():
    one = entry(1000).nbytes
    store = LocalStore(size=100 * one)
    store.insert(key("other"), "other/1/r", entry(1000))
    for i in range(5):
        store.get(key(f"m{i}"))
        store.get(key(f"m{i}"))
        store.insert(key(f"m{i}"), "m/1/r", entry(1000), owner_budget=2 * one)
    assert store.counts["m/1/r"].entries == 2
    assert store.counts["m/1/r"].bytes <= 2 * one
    assert store.get(key("other")) is not None


def test_one_off_keys_do_not_evict_hot_entries():
    """Under a stream of unique requests, entries asked for repeatedly stay (TinyLFU)."""
    one = entry(1000).nbytes
    store = LocalStore(size=10 * one)
    hot = [key(f"hot{i}") for i in range(10)]
    for _ in range(3):
        for k in hot:
            if store.get(k) is None:
                store.insert(k, "m/1/r", entry(1000))
    for i in range(5000):
        k = key(f"once{i}")
        if store.get(k) is None:
            store.insert(k, "m/1/r", entry(1000))
    assert all(store.get(k) is not None for k in hot)
    assert store.counts["m/1/r"].rejected_admission >= 4990


def test_a_plain_lru_would_have_lost_them():
    """The same traffic with admission disabled (every candidate more frequent) churns."""
    one = entry(1000).nbytes
    store = LocalStore(size=10 * one)
    hot = [key(f"hot{i}") for i in range(10)]
    for k in hot:
        store.insert(k, "m/1/r", entry(1000))
    for i in range(50):
        k = key(f"once{i}")
        for _ in range(20):
            store.get(k)  # asked for often: now more frequent than the hot keys
        store.insert(k, "m/1/r", entry(1000))
    assert all(store.get(k) is None for k in hot)


def test_entries_expire_after_their_ttl():
    clock = Clock()
    store = LocalStore(size=1 << 20, default_ttl_s=10, clock=clock)
    store.insert(key("a"), "m/1/r", entry())
    store.insert(key("b"), "m/1/r", entry(), ttl_s=100)
    clock.now += 11
    assert store.get(key("a")) is None
    assert store.get(key("b")) is not None
    assert store.counts["m/1/r"].expired == 1
    assert store.counts["m/1/r"].entries == 1


def test_dropping_an_owner_removes_exactly_its_entries():
    store = LocalStore(size=1 << 20)
    store.insert(key("a"), "m/1/old", entry())
    store.insert(key("b"), "m/1/new", entry())
    assert store.drop_owner("m/1/old") == 1
    assert store.get(key("a")) is None and store.get(key("b")) is not None
    assert store.bytes == store.counts["m/1/new"].bytes


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(1, 3000), st.sampled_from(["a/1/r", "b/1/r"])),
        max_size=200,
    ),
    st.integers(2000, 20000),
    st.integers(0, 8000),
)
def test_budgets_and_byte_counts_hold_for_any_traffic(operations, size, model_budget):
    store = LocalStore(size=size)
    for name, nbytes, owner in operations:
        k = key(str(name))
        if store.get(k) is None:
            store.insert(k, owner, entry(nbytes), owner_budget=model_budget if owner == "a/1/r" else 0)
        assert store.bytes <= size
        if model_budget:
            assert store.counts.get("a/1/r") is None or store.counts["a/1/r"].bytes <= model_budget
        assert store.bytes == sum(c.bytes for c in store.counts.values())
        assert len(store) == sum(c.entries for c in store.counts.values())
