"""Where the response cache is configured: Triton's response_cache field and --cache-config,
Convoy's response_cache_* parameters; what cannot be honoured is refused naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from convoy.config import FlagError, parse_cache_config, parse_metrics_config
from convoy.engine.model_config import build_model_config
from convoy.errors import InvalidConfig
from convoy.protos import model_config_pb2 as mc


def _proto(**parameters) -> mc.ModelConfig:
    proto = mc.ModelConfig(name="m", backend="python", max_batch_size=8)
    proto.input.add(name="IN", data_type=mc.TYPE_FP32, dims=[4])
    proto.output.add(name="OUT", data_type=mc.TYPE_FP32, dims=[4])
    proto.response_cache.enable = True
    for key, value in parameters.items():
        proto.parameters[key].string_value = value
    return proto


def _refusal(proto) -> str:
    with pytest.raises(InvalidConfig) as caught:
        build_model_config(proto, Path("/repo/m"))
    return str(caught.value)


def test_rows_are_cached_one_by_one_with_dynamic_batching_and_whole_without():
    proto = _proto(response_cache_ttl_s="30", response_cache_max_bytes="4096")
    assert build_model_config(proto, Path("/repo/m")).response_cache.rows is False
    proto.dynamic_batching.SetInParent()
    policy = build_model_config(proto, Path("/repo/m")).response_cache
    assert (policy.rows, policy.ttl_s, policy.max_bytes, policy.per_key) == (True, 30.0, 4096, False)


def test_a_model_without_response_cache_is_not_cached():
    proto = _proto()
    proto.ClearField("response_cache")
    assert build_model_config(proto, Path("/repo/m")).response_cache is None


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda p: setattr(p.model_transaction_policy, "decoupled", True),
            "response_cache.enable: a decoupled",
        ),
        (lambda p: p.sequence_batching.SetInParent(), "response_cache.enable: a sequence model"),
        (
            lambda p: p.parameters["response_cache_ttl"].__setattr__("string_value", "5"),
            "parameters.response_cache_ttl: is not",
        ),
        (
            lambda p: p.parameters["response_cache_ttl_s"].__setattr__("string_value", "-1"),
            "parameters.response_cache_ttl_s: expected",
        ),
        (
            lambda p: p.parameters["response_cache_rows"].__setattr__("string_value", "maybe"),
            "parameters.response_cache_rows: expected true or false",
        ),
        (
            lambda p: (
                p.ClearField("response_cache")
                or p.parameters["response_cache_per_key"].__setattr__("string_value", "true")
            ),
            "has no effect without response_cache",
        ),
    ],
)
def test_what_the_cache_cannot_honour_is_refused_naming_the_field(change, named):
    proto = _proto()
    change(proto)
    assert named in _refusal(proto)


def test_an_ensemble_is_refused_pointing_at_its_composing_models():
    proto = mc.ModelConfig(name="m", platform="ensemble", max_batch_size=8)
    proto.response_cache.enable = True
    proto.ensemble_scheduling.step.add(model_name="x", model_version=-1)
    assert "enable the cache on its composing models" in _refusal(proto)


def test_histogram_buckets_per_model_follow_model_metrics():
    proto = _proto()
    control = proto.model_metrics.metric_control.add()
    control.metric_identifier.family = "convoy_request_latency_seconds"
    control.histogram_options.buckets.extend([0.001, 0.01, 0.1])
    config = build_model_config(proto, Path("/repo/m"))
    assert config.metric_buckets == {"convoy_request_latency_seconds": (0.001, 0.01, 0.1)}
    control.metric_identifier.family = "nv_inference_request_duration_us"
    assert "is not a histogram whose buckets can be set" in _refusal(proto)
    control.metric_identifier.family = "convoy_batch_size"
    control.histogram_options.ClearField("buckets")
    control.histogram_options.buckets.extend([4, 2])
    assert "expected strictly increasing finite bounds in rows" in _refusal(proto)


def test_cache_config_spells_triton_flags():
    local = parse_cache_config(["local,size=1048576"])
    assert (local.kind, local.size, local.ttl_s) == ("local", 1048576, 0.0)
    assert parse_cache_config([], byte_size=2048).size == 2048
    redis = parse_cache_config(["redis,host=cache", "redis,port=6379", "redis,ttl=60,pool_size=8"])
    assert (redis.host, redis.port, redis.ttl_s, redis.pool_size) == ("cache", 6379, 60.0, 8)
    assert parse_cache_config(["redis,host=h,port=1"]).ttl_s == 3600.0
    assert parse_cache_config([]) is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["local"], "needs size=BYTES"),
        (["memcached,size=1"], "unknown cache 'memcached'"),
        (["local,size=1", "redis,host=h"], "one cache at a time"),
        (["local,sise=1"], "'sise' is not a local cache setting"),
        (["redis,host=h"], "needs port="),
        (["local,size=lots"], "expected a whole number"),
    ],
)
def test_a_bad_cache_config_is_refused_with_the_reason(values, message):
    with pytest.raises(FlagError, match=message):
        parse_cache_config(values)


def test_metrics_config_takes_triton_settings_and_refuses_summaries():
    settings = parse_metrics_config(
        ["histogram_latencies=true", "counter_latencies=false"], interval_ms=500
    )
    assert (settings.histogram_latencies, settings.counter_latencies, settings.interval_ms) == (
        True,
        False,
        500,
    )
    with pytest.raises(FlagError, match="cannot be aggregated across replicas"):
        parse_metrics_config(["summary_latencies=true"])
    with pytest.raises(FlagError, match="expected counter_latencies"):
        parse_metrics_config(["histogram_latency=true"])
