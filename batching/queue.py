"""The bounded priority queue a scheduler draws its batches from.

One FIFO per priority level (index 0 is the highest) plus one for requests whose timeout passed
under the DELAY action, which wait behind everything else. A roll-out's mirrored requests
(`Request.mirror`) join that last FIFO on arrival: they run only when nothing else waits, and
count against no level's capacity (the roll-out bounds them itself). Requests that leave early
(cancelled, expired) are discarded lazily: their slot is freed at once, the entry is skipped when
reached.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

from convoy.types import Request, RequestState


class BatchBudget(Protocol):
    """What a batch may cost beyond its rows (padded batching: rows x padded length), and which
    requests unequal to the batch's leader may still fill it."""

    #: Most a batch may cost (0: no ceiling); its leader always goes, whatever it costs.
    max_cost: int

    def joins(self, lead: Hashable, key: Hashable) -> bool:
        """A request keyed `key` may fill a batch led by a request keyed `lead`."""
        ...

    def cost(self, lead: Hashable, request: Request) -> int:
        """What `request` adds to the cost of a batch led by `lead`."""
        ...


def _live(request: Request) -> bool:
    return request.state is RequestState.QUEUED and not request.future.done()


class PriorityQueue:
    def __init__(self, capacities: list[int]) -> None:
        """`capacities[i]`: most live requests level i may hold."""
        self._levels: list[deque[Request]] = [deque() for _ in capacities]
        self._delayed: deque[Request] = deque()
        self._capacities = capacities
        self._counts = [0] * len(capacities)
        self._level_rows = [0] * len(capacities)
        #: Live requests and their rows over all levels.
        self.size = 0
        self.rows = 0
        #: Live mirrored requests (in the last FIFO, on no level's count).
        self.mirrors = 0

    @property
    def level_count(self) -> int:
        return len(self._levels)

    def depth(self, level: int) -> int:
        return self._counts[level]

    def rows_through(self, level: int) -> int:
        """Live rows at this priority level and every higher one: what a new request at
        `level` queues behind."""
        return sum(self._level_rows[: level + 1])

    def has_room(self, level: int) -> bool:
        return self._counts[level] < self._capacities[level]

    def push(self, request: Request) -> None:
        """Append to its level (the caller checked `has_room`); a mirror goes behind everything."""
        if request.mirror:
            request.delayed = True
            self._delayed.append(request)
            self.mirrors += 1
            self.size += 1
            self.rows += request.rows
            return
        self._levels[request.level].append(request)
        self._counts[request.level] += 1
        self._level_rows[request.level] += request.rows
        self.size += 1
        self.rows += request.rows

    def discard(self, request: Request) -> None:
        """Account for a queued request leaving early; its entry is skipped later."""
        if request.mirror:
            self.mirrors -= 1
        else:
            self._counts[request.level] -= 1
            self._level_rows[request.level] -= request.rows
        self.size -= 1
        self.rows -= request.rows

    def delay(self, request: Request) -> None:
        """Move a request behind everything else (timeout_action DELAY). It still counts
        against its level's max_queue_size."""
        request.delayed = True
        self._delayed.append(request)

    def _queues(self) -> Iterator[deque[Request]]:
        yield from self._levels
        yield self._delayed

    def _clean_head(self, fifo: deque[Request], delayed: bool) -> Request | None:
        """Drop entries that left or moved until a live one heads the FIFO."""
        while fifo:
            head = fifo[0]
            if head.delayed is delayed and _live(head):
                return head
            fifo.popleft()
            if head.state is RequestState.QUEUED and head.delayed is delayed:
                # Its future was cancelled without the scheduler being told: free the slot.
                head.state = RequestState.FINISHED
                self.discard(head)
        return None

    def oldest(self) -> Request | None:
        """The request the next batch starts with: the head of the highest non-empty level."""
        for fifo in self._levels:
            head = self._clean_head(fifo, False)
            if head is not None:
                return head
        return self._clean_head(self._delayed, True)

    def take(
        self,
        max_rows: int,
        max_requests: int,
        key: Callable[[Request], Hashable],
        scan_limit: int = 256,
        budget: BatchBudget | None = None,
    ) -> list[Request]:
        """Remove and return a batch of live, mutually compatible requests in priority order.

        Compatibility is `key` equality with the first request taken (the oldest: it always
        leads its batch). Requests that do not fit (incompatible, or too many rows) are passed
        over and keep their place; at most `scan_limit` are passed over, which bounds the cost
        of one batch. With a `budget`, the batch also stops at its cost ceiling, and when the
        leader's equals leave room, a second pass fills it with requests the budget lets join.
        """
        batch: list[Request] = []
        progress: list[Any] = [0, 0, None]  # rows, cost, the leader's key
        self._gather(batch, progress, max_rows, max_requests, key, scan_limit, budget, False)
        room = bool(batch) and len(batch) < max_requests and progress[0] < max_rows
        if budget is not None and room and (not budget.max_cost or progress[1] < budget.max_cost):
            self._gather(batch, progress, max_rows, max_requests, key, scan_limit, budget, True)
        return batch

    def _gather(
        self,
        batch: list[Request],
        progress: list[Any],
        max_rows: int,
        max_requests: int,
        key: Callable[[Request], Hashable],
        scan_limit: int,
        budget: BatchBudget | None,
        filling: bool,
    ) -> None:
        """One pass over the queues adding what fits to `batch`: key equals the leader's (or,
        `filling`, the budget `joins` it); `progress` (rows, cost, leader's key) carries over."""
        rows: int
        cost: int
        lead: Hashable | None
        rows, cost, lead = progress
        max_cost = budget.max_cost if budget is not None else 0
        passed_over = 0
        for index, fifo in enumerate(self._queues()):
            delayed = index == len(self._levels)
            skipped: list[Request] = []
            while fifo and len(batch) < max_requests and rows < max_rows:
                if max_cost and cost >= max_cost:
                    break
                request = fifo.popleft()
                if request.delayed is not delayed or not _live(request):
                    if request.state is RequestState.QUEUED and request.delayed is delayed:
                        request.state = RequestState.FINISHED
                        self.discard(request)
                    continue
                request_key = key(request)
                if lead is None:
                    lead = request_key
                fits = rows + request.rows <= max_rows
                if filling:
                    assert budget is not None  # take() fills only with a budget
                    fits = fits and request_key != lead and budget.joins(lead, request_key)
                else:
                    fits = fits and request_key == lead
                added = budget.cost(lead, request) if budget is not None else 0
                if fits and batch and max_cost and cost + added > max_cost:
                    fits = False
                if not fits:
                    skipped.append(request)
                    passed_over += 1
                    if passed_over >= scan_limit:
                        break
                    continue
                batch.append(request)
                rows += request.rows
                cost += added
                request.state = RequestState.RUNNING
                self.discard(request)
            if skipped:
                fifo.extendleft(reversed(skipped))
            if (
                len(batch) >= max_requests
                or rows >= max_rows
                or passed_over >= scan_limit
                or (max_cost and cost >= max_cost)
            ):
                break
        progress[:] = [rows, cost, lead]

    def fills_budget(
        self,
        lead: Request,
        key: Callable[[Request], Hashable],
        budget: BatchBudget,
        scan_limit: int = 256,
    ) -> bool:
        """Whether the batch `lead` would head already reaches the budget's cost ceiling: the
        live requests `take` would add (its key's equals, and those the budget lets fill), at
        their cost in a batch it leads. Reads the queue, changes nothing; looks at most at
        `scan_limit` requests."""
        lead_key = key(lead)
        cost = 0
        seen = 0
        for index, fifo in enumerate(self._queues()):
            delayed = index == len(self._levels)
            for request in fifo:
                if request.delayed is not delayed or not _live(request):
                    continue
                request_key = key(request)
                if request_key == lead_key or budget.joins(lead_key, request_key):
                    cost += budget.cost(lead_key, request)
                    if cost >= budget.max_cost:
                        return True
                seen += 1
                if seen >= scan_limit:
                    return False
        return False

    def drain(self) -> list[Request]:
        """Remove every live request (shutdown)."""
        left: list[Request] = []
        for index, fifo in enumerate(self._queues()):
            delayed = index == len(self._levels)
            while fifo:
                request = fifo.popleft()
                if request.delayed is delayed and request.state is RequestState.QUEUED:
                    request.state = RequestState.FINISHED
                    self.discard(request)
                    left.append(request)
        return left
