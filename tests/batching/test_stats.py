"""The counters behind the statistics API and the metrics: fixed-bucket histograms and what each
recording point adds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from convoy.batching.stats import BATCH_SIZE_BOUNDS, LATENCY_BOUNDS_NS, Histogram, ModelStats


def test_value_on_a_bound_counts_in_that_bucket():
    histogram = Histogram((10, 20, 30))
    for value in (0, 10, 11, 20, 30, 31, 10**9):
        histogram.add(value)
    # le=10: 0 and 10; le=20: 11 and 20; le=30: 30; above every bound: 31 and 10**9.
    assert histogram.buckets == [2, 2, 1, 2]
    assert histogram.count == 7
    assert histogram.ns == histogram.total == 0 + 10 + 11 + 20 + 30 + 31 + 10**9


@given(st.lists(st.integers(min_value=0, max_value=2 * LATENCY_BOUNDS_NS[-1])))
def test_buckets_account_for_every_observation(values):
    histogram = Histogram(LATENCY_BOUNDS_NS)
    for value in values:
        histogram.add(value)
    assert sum(histogram.buckets) == histogram.count == len(values)
    assert histogram.total == sum(values)
    for index, bound in enumerate(LATENCY_BOUNDS_NS):
        below = sum(histogram.buckets[: index + 1])
        assert below == sum(1 for v in values if v <= bound)


def test_each_stats_object_has_its_own_histograms():
    first, second = ModelStats(), ModelStats()
    first.success.add(5)
    assert second.success.count == 0
    assert first.success.bounds is LATENCY_BOUNDS_NS


def test_record_batch_observes_compute_time_and_rows_once_per_batch():
    stats = ModelStats()
    stats.record_batch(rows=6, requests=3, input_ns=100, infer_ns=2_000, output_ns=50, reason="full")
    stats.record_batch(rows=1, requests=1, input_ns=10, infer_ns=20, output_ns=30, reason="full")
    assert stats.batch_compute.count == 2
    assert stats.batch_compute.total == 2_150 + 60
    assert stats.batch_size.count == stats.execution_count == 2
    assert stats.batch_size.total == stats.inference_count == 7
    assert stats.batch_size.buckets[BATCH_SIZE_BOUNDS.index(1)] == 1
    assert stats.batch_size.buckets[BATCH_SIZE_BOUNDS.index(8)] == 1  # 6 rows: 4 < 6 <= 8
    # Per-request compute durations, as Triton's statistics report them.
    assert stats.compute_infer.count == 4
    assert stats.compute_infer.ns == 2_000 * 3 + 20
    assert stats.dispatch_reasons == {"full": 2}


def test_rejection_is_a_rejected_failure_counted_by_reason():
    stats = ModelStats()
    stats.record_rejection("queue_full", 1_000)
    stats.record_rejection("timeout", 2_000)
    stats.record_rejection("queue_full", 3_000)
    assert stats.failures_by_reason == {"REJECTED": 3}
    assert stats.rejections == {"queue_full": 2, "timeout": 1}
    assert stats.fail.count == 3
    assert stats.fail.ns == 6_000
