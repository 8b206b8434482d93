"""The mirror budget: how much of a version's instance time a roll-out's mirrored requests may use.

A token bucket measured in instance-nanoseconds: it refills at `share` x instances per nanosecond
(share 0.25 with 2 instances: half a second of compute per second of wall time) and holds at most
BURST_S of that, so mirrors are spread out rather than run back to back (a full second of burst
let 250 ms of candidate compute run at once, which showed in stable's p99). A mirror is admitted
while the bucket is not empty and fewer than `max_queue` mirrors are queued or running on the
version; when its batch finishes, the batch's compute time
is taken from the bucket (once per batch, however many mirrors rode in it: the whole batch, which
over-charges a batch shared with clients' requests, never under-charges). Anything else is
dropped and counted by reason: the client's answer never waits on a mirror.
"""

from __future__ import annotations

from convoy.types import StageTimes

NS = 1_000_000_000
#: Seconds of refill the bucket holds.
BURST_S = 0.05


class MirrorBudget:
    __slots__ = ("_charged", "_last_ns", "capacity_ns", "in_flight", "max_queue", "rate", "tokens_ns")

    def __init__(self, share: float, instances: int, max_queue: int, now_ns: int) -> None:
        self.rate = share * max(instances, 1)
        self.capacity_ns = self.rate * NS * BURST_S
        self.tokens_ns = self.capacity_ns
        self.max_queue = max_queue
        self.in_flight = 0
        self._last_ns = now_ns
        #: The last batch charged (its StageTimes, shared by every response of the batch).
        self._charged: StageTimes | None = None

    def _refill(self, now_ns: int) -> None:
        elapsed = now_ns - self._last_ns
        if elapsed > 0:
            self.tokens_ns = min(self.capacity_ns, self.tokens_ns + elapsed * self.rate)
            self._last_ns = now_ns

    def admit(self, now_ns: int) -> str:
        """ "" when a mirror may go now (it counts as in flight), else why not: "queue" (as many
        mirrors as allowed are queued or running) or "budget" (the time share is spent)."""
        if self.in_flight >= self.max_queue:
            return "queue"
        self._refill(now_ns)
        if self.tokens_ns <= 0:
            return "budget"
        self.in_flight += 1
        return ""

    def finished(self, timings: StageTimes | None, now_ns: int) -> None:
        """A mirror came back: it no longer counts, and its batch's compute time is paid."""
        self.in_flight -= 1
        if timings is None or timings is self._charged:
            return
        self._charged = timings
        self._refill(now_ns)
        self.tokens_ns -= max(timings.done_ns - timings.compute_start_ns, 0)
