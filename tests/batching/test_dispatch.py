"""The dispatch decision on its own: a queue, the request at its head, the clock, and the rule.

No scheduler and no runtime: each test queues requests at chosen monotonic times and asks the
rule whether the batch goes at a chosen `now`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from scheduler_fakes import model_config

from convoy.batching.assemble import collation_for
from convoy.batching.dispatch import DispatchRule
from convoy.batching.queue import PriorityQueue
from convoy.config import DynamicBatching, ModelConfig
from convoy.types import Request, RequestState

MS = 1_000_000
DELAY_US = 10_000  # 10 ms


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def rule_for(config: ModelConfig) -> DispatchRule:
    return DispatchRule(config, collation_for(config))


def queued(loop, queue: PriorityQueue, at_ns: int, rows: int = 1) -> Request:
    request = Request(
        id=str(at_ns),
        inputs={"INPUT0": np.zeros((rows, 1), dtype=np.int64)},
        requested_outputs=(),
        rows=rows,
        future=loop.create_future(),
        received_ns=at_ns,
    )
    request.state = RequestState.QUEUED
    request.queued_ns = at_ns
    queue.push(request)
    return request


def decide(rule: DispatchRule, queue: PriorityQueue, now: int, **state) -> tuple[str | None, int]:
    state = {"executing_rows": 0, "waited_for_instance": False, "instances": 1, **state}
    oldest = queue.oldest()
    assert oldest is not None
    return rule.decide(queue, oldest, now, **state)


def test_without_dynamic_batching_each_request_goes_alone_at_once(loop):
    rule = rule_for(model_config(8, None))
    queue = PriorityQueue([16])
    queued(loop, queue, 0)
    queued(loop, queue, 0)
    assert decide(rule, queue, 0) == ("unbatched", 8)


def test_triton_rule_holds_a_lone_request_until_the_delay_expires(loop):
    rule = rule_for(model_config(8, DynamicBatching(max_queue_delay_us=DELAY_US)))
    queue = PriorityQueue([16])
    oldest = queued(loop, queue, 100 * MS)
    # An idle instance, nothing executing: Triton's rule still waits out the delay.
    assert decide(rule, queue, 105 * MS) == (None, 8)
    assert rule.dispatch_by_ns(oldest, 1) == 110 * MS
    assert decide(rule, queue, 110 * MS) == ("delay_expired", 8)


def test_triton_rule_sends_the_largest_reachable_preferred_size(loop):
    batching = DynamicBatching(max_queue_delay_us=DELAY_US, preferred_batch_sizes=(2, 4))
    rule = rule_for(model_config(8, batching))
    queue = PriorityQueue([16])
    queued(loop, queue, 0)
    assert decide(rule, queue, 0) == (None, 8)
    for _ in range(2):
        queued(loop, queue, 0)
    assert decide(rule, queue, 0) == ("preferred_size", 2)
    queued(loop, queue, 0)
    assert decide(rule, queue, 0) == ("preferred_size", 4)


def test_triton_rule_without_preferred_sizes_goes_when_full(loop):
    rule = rule_for(model_config(4, DynamicBatching(max_queue_delay_us=DELAY_US)))
    queue = PriorityQueue([16])
    queued(loop, queue, 0, rows=3)
    assert decide(rule, queue, 0) == (None, 4)
    queued(loop, queue, 0)
    assert decide(rule, queue, 0) == ("full", 4)


def latency_first(max_batch_size: int = 8) -> DispatchRule:
    batching = DynamicBatching(max_queue_delay_us=DELAY_US, latency_first=True)
    return rule_for(model_config(max_batch_size, batching))


def test_latency_first_goes_at_once_when_nothing_executes(loop):
    rule = latency_first()
    queue = PriorityQueue([16])
    queued(loop, queue, 0)
    assert decide(rule, queue, 0) == ("queue_drained", 8)


def test_latency_first_takes_what_waited_for_a_freed_instance(loop):
    rule = latency_first()
    queue = PriorityQueue([16])
    queued(loop, queue, 0)
    assert decide(rule, queue, 0, executing_rows=4, waited_for_instance=True) == (
        "instance_freed",
        8,
    )


def test_latency_first_waits_while_arrivals_can_still_grow_the_batch(loop):
    rule = latency_first()
    queue = PriorityQueue([16])
    for at in range(0, 20 * MS, MS // 10):  # one arrival every 0.1 ms
        rule.arrived(at)
    queued(loop, queue, 20 * MS)
    assert decide(rule, queue, 21 * MS, executing_rows=4) == (None, 8)
    assert decide(rule, queue, 30 * MS, executing_rows=4) == ("delay_expired", 8)


def test_latency_first_goes_when_nothing_more_is_expected_before_the_delay(loop):
    rule = latency_first()
    queue = PriorityQueue([16])
    for at in range(0, 200 * MS, 50 * MS):  # one arrival every 50 ms: longer than the delay
        rule.arrived(at)
    queued(loop, queue, 200 * MS)
    assert decide(rule, queue, 201 * MS, executing_rows=4) == ("queue_drained", 8)


def test_latency_first_full_batch_goes_at_once(loop):
    rule = latency_first(max_batch_size=2)
    queue = PriorityQueue([16])
    queued(loop, queue, 0)
    queued(loop, queue, 0)
    assert decide(rule, queue, 0, executing_rows=4) == ("full", 2)
