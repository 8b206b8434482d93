"""The local response cache: entries in this process's memory under byte budgets.

- A global budget (`--cache-config local,size=N`) and an optional per-model one
  (`response_cache_max_bytes`): a model over its own budget evicts only its own entries.
- Least recently used entries go first, but only for a candidate more frequently asked for than
  each entry it would push out (TinyLFU admission, Einziger et al.): a count-min sketch of
  recent key frequencies, halved every `10 x width` lookups so it forgets. A stream of one-off
  requests then leaves the hot entries alone instead of churning the whole cache, which is what
  a plain LRU (Triton's local cache) does under unique traffic.
- Entries expire after their TTL (checked on lookup; expired entries are also the first to go
  when room is needed).

Everything runs on the event loop thread; the metrics exporter reads the counters from its own
(int reads and dict copies are atomic under the GIL).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

#: Bytes counted per entry beyond its tensors (key, bookkeeping).
ENTRY_OVERHEAD = 160


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A cached response (or one row of it): owned, read-only arrays."""

    outputs: dict[str, np.ndarray]
    #: Response parameters the model set, or None.
    parameters: dict[str, Any] | None
    nbytes: int
    #: Estimated compute the entry saves each time it answers (ns).
    cost_ns: int


def entry_from(
    outputs: dict[str, np.ndarray], parameters: dict[str, Any] | None, cost_ns: int
) -> CacheEntry:
    """An entry owning copies of `outputs` (a response's arrays view its whole batch)."""
    owned = {}
    size = ENTRY_OVERHEAD
    for name, array in outputs.items():
        copy = np.array(array, copy=True)
        copy.flags.writeable = False
        owned[name] = copy
        size += len(name) + tensor_bytes(copy)
    return CacheEntry(owned, dict(parameters) if parameters else None, size, cost_ns)


def tensor_bytes(array: np.ndarray) -> int:
    if array.dtype == object:
        return sum(len(x) + 8 for x in array.reshape(-1))
    return array.nbytes


@dataclass(slots=True)
class StoreCounts:
    """What one model's entries hold and what happened to them."""

    entries: int = 0
    bytes: int = 0
    evictions: int = 0
    expired: int = 0
    #: Candidates refused: by admission (less asked for than what they would evict), or too
    #: large for the budget at all.
    rejected_admission: int = 0
    rejected_size: int = 0
    inserted: int = 0


@dataclass(slots=True)
class _Slot:
    entry: CacheEntry
    owner: str
    expires: float


class FrequencySketch:
    """Count-min sketch of key frequencies (4 rows of counters capped at 15), aged by halving.
    A key's four counters come from 64 of its (uniformly distributed) digest bits."""

    def __init__(self, width_bits: int = 16) -> None:
        self._bits = width_bits
        self._mask = (1 << width_bits) - 1
        width = 1 << width_bits
        self._counts = bytearray(4 * width)
        self._additions = 0
        self._reset_at = 10 * width

    def _slots(self, key: bytes) -> tuple[int, int, int, int]:
        h = int.from_bytes(key[:8], "little")
        bits, mask = self._bits, self._mask
        width = mask + 1
        return (
            h & mask,
            width + ((h >> bits) & mask),
            2 * width + ((h >> (2 * bits)) & mask),
            3 * width + ((h >> (3 * bits)) & mask),
        )

    def add(self, key: bytes) -> None:
        table = self._counts
        for slot in self._slots(key):
            if table[slot] < 15:
                table[slot] += 1
        self._additions += 1
        if self._additions >= self._reset_at:
            halved = np.frombuffer(self._counts, dtype=np.uint8) >> 1
            self._counts[:] = halved.tobytes()
            self._additions //= 2

    def estimate(self, key: bytes) -> int:
        table = self._counts
        a, b, c, d = self._slots(key)
        return min(table[a], table[b], table[c], table[d])


class LocalStore:
    """Keyed entries under the global byte budget; see the module docstring."""

    synchronous: Literal[True] = True

    def __init__(
        self, size: int, default_ttl_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.size = size
        self.default_ttl_s = default_ttl_s
        self._clock = clock
        self._slots: OrderedDict[bytes, _Slot] = OrderedDict()
        #: Per owner (model name) keys in LRU order, for per-model budgets and invalidation.
        self._owned: dict[str, OrderedDict[bytes, None]] = {}
        self.bytes = 0
        self.counts: dict[str, StoreCounts] = {}
        self.sketch = FrequencySketch()

    def __len__(self) -> int:
        return len(self._slots)

    def _counts(self, owner: str) -> StoreCounts:
        counts = self.counts.get(owner)
        if counts is None:
            counts = self.counts[owner] = StoreCounts()
        return counts

    def get(self, key: bytes) -> CacheEntry | None:
        self.sketch.add(key)
        slot = self._slots.get(key)
        if slot is None:
            return None
        if slot.expires and slot.expires <= self._clock():
            self._remove(key, slot)
            self._counts(slot.owner).expired += 1
            return None
        self._slots.move_to_end(key)
        self._owned[slot.owner].move_to_end(key)
        return slot.entry

    def insert(
        self, key: bytes, owner: str, entry: CacheEntry, ttl_s: float = 0.0, owner_budget: int = 0
    ) -> bool:
        """Insert unless refused (too large, or less frequent than what it would evict)."""
        counts = self._counts(owner)
        size = entry.nbytes
        if size > self.size or (owner_budget and size > owner_budget):
            counts.rejected_size += 1
            return False
        old = self._slots.get(key)
        if old is not None:
            self._remove(key, old)
        victims = self._victims(key, size, owner, owner_budget)
        if victims is None:
            counts.rejected_admission += 1
            return False
        for victim_key, victim in victims:
            self._remove(victim_key, victim)
            self._counts(victim.owner).evictions += 1
        ttl = ttl_s or self.default_ttl_s
        self._slots[key] = _Slot(entry, owner, self._clock() + ttl if ttl else 0.0)
        self._owned.setdefault(owner, OrderedDict())[key] = None
        self.bytes += size
        counts.entries += 1
        counts.bytes += size
        counts.inserted += 1
        return True

    def _victims(
        self, candidate_key: bytes, size: int, owner: str, owner_budget: int
    ) -> list[tuple[bytes, _Slot]] | None:
        """The entries to evict for `size` more bytes of `owner` (expired ones first, then the
        least recently used, of `owner` alone when its own budget is what is short); None when
        admission refuses the candidate."""
        now = self._clock()
        victims: list[tuple[bytes, _Slot]] = []
        chosen: set[bytes] = set()
        freed_owner = 0
        freed = 0
        candidate = None  # its frequency, looked up only if an unexpired entry must go

        def take(key: bytes, slot: _Slot) -> bool:
            nonlocal freed, freed_owner, candidate
            if slot.expires and slot.expires <= now:
                pass  # expired: free to evict
            else:
                if candidate is None:
                    candidate = self.sketch.estimate(candidate_key)
                if self.sketch.estimate(key) >= candidate:
                    return False
            victims.append((key, slot))
            chosen.add(key)
            freed += slot.entry.nbytes
            if slot.owner == owner:
                freed_owner += slot.entry.nbytes
            return True

        owned = self._owned.get(owner)
        if owner_budget and owned is not None:
            used = self._counts(owner).bytes
            for key in owned:
                if used - freed_owner + size <= owner_budget:
                    break
                if not take(key, self._slots[key]):
                    return None
        for key, slot in self._slots.items():
            if self.bytes - freed + size <= self.size:
                break
            if key in chosen:
                continue
            if not take(key, slot):
                return None
        return victims

    def _remove(self, key: bytes, slot: _Slot) -> None:
        del self._slots[key]
        owned = self._owned.get(slot.owner)
        if owned is not None:
            owned.pop(key, None)
        self.bytes -= slot.entry.nbytes
        counts = self._counts(slot.owner)
        counts.entries -= 1
        counts.bytes -= slot.entry.nbytes

    def drop_owner(self, owner: str) -> int:
        """Remove every entry of `owner` (its model was unloaded or changed); how many."""
        owned = self._owned.pop(owner, None)
        if not owned:
            return 0
        for key in list(owned):
            slot = self._slots.get(key)
            if slot is not None:
                self._remove(key, slot)
        return len(owned)

    def owners(self) -> list[str]:
        return list(self._owned)
