"""Triton's trace settings on their own: levels (defaults, global, per model), clearing, the
sampling that trace_rate and trace_count decide, Triton's words for bad values, and the start-up
flags (--trace-config) read into them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convoy.errors import InvalidInput, Unsupported
from convoy.trace_settings import TraceControl, TraceDefaults, TraceValues, trace_setup

ON = TraceDefaults(TraceValues(("TIMESTAMPS",), 1, -1, 0), exporting=True)


def _short(settings: dict) -> tuple:
    return (settings["trace_level"], settings["trace_rate"], settings["trace_count"])


def test_models_follow_the_global_values_they_leave_unset():
    control = TraceControl(ON)
    assert _short(control.settings()) == (["TIMESTAMPS"], "1", "-1")
    assert control.settings()["trace_mode"] == "opentelemetry"
    control.update("m", {"trace_rate": "12"})
    control.update("", {"trace_rate": "56", "trace_count": "78", "trace_level": ["OFF"]})
    assert _short(control.settings()) == (["OFF"], "56", "78")
    assert _short(control.settings("m")) == (["OFF"], "12", "78")
    assert _short(control.settings("other")) == (["OFF"], "56", "78")
    # Cleared global values go back to the start-up ones; the model keeps its own rate.
    control.update("", {"trace_rate": None, "trace_count": None})
    assert _short(control.settings()) == (["OFF"], "1", "-1")
    assert _short(control.settings("m")) == (["OFF"], "12", "-1")
    control.update("m", {"trace_rate": None})
    assert _short(control.settings("m")) == (["OFF"], "1", "-1")


def test_rate_samples_one_request_in_n_and_count_stops_after_that_many():
    control = TraceControl(ON)
    control.update("", {"trace_rate": "3", "trace_count": "2"})
    sampled = [control.sample("m") for _ in range(12)]
    assert sampled == [False, False, True, False, False, True] + [False] * 6
    assert control.settings()["trace_count"] == "0"
    # A request carrying the client's trace context is traced whatever rate and count say.
    assert control.sample("m", has_parent=True)
    # Changing the level's settings starts its count again.
    control.update("", {"trace_count": "1"})
    assert [control.sample("m") for _ in range(6)] == [False, False, True, False, False, False]


def test_a_model_with_settings_of_its_own_samples_on_its_own():
    control = TraceControl(ON)
    control.update("busy", {"trace_count": "1"})
    assert [control.sample("busy") for _ in range(3)] == [True, False, False]
    assert [control.sample("other") for _ in range(3)] == [True, True, True]
    assert control.settings("busy")["trace_count"] == "0"
    assert control.settings()["trace_count"] == "-1"


def test_level_off_traces_nothing_not_even_a_propagated_context():
    control = TraceControl(ON)
    control.update("", {"trace_level": ["OFF"]})
    assert not control.sample("m") and not control.sample("m", has_parent=True)


def test_rate_zero_traces_only_requests_that_carry_a_trace_context():
    control = TraceControl(ON)
    control.update("", {"trace_rate": "0"})
    assert not any(control.sample("m") for _ in range(5))
    assert control.sample("m", has_parent=True)


@given(st.integers(1, 9), st.integers(-1, 9), st.integers(0, 60))
def test_sampling_never_exceeds_what_rate_and_count_allow(rate, count, requests):
    control = TraceControl(ON)
    control.update("", {"trace_rate": str(rate), "trace_count": str(count)})
    traced = sum(control.sample("m") for _ in range(requests))
    allowed = requests // rate
    assert traced == (allowed if count == -1 else min(allowed, count))


@pytest.mark.parametrize(
    ("changes", "error", "text"),
    [
        (
            {"trace_file": "x.log"},
            Unsupported,
            "trace file location can not be updated through network protocol",
        ),
        (
            {"trace_level": ["OFF", "TIMESTAMPS"]},
            InvalidInput,
            "Expect only one trace level 'OFF' is specified",
        ),
        ({"trace_rate": "often"}, InvalidInput, "Unable to parse 'trace_rate', got: often"),
        (
            {"trace_count": "-2"},
            InvalidInput,
            "Unable to parse 'trace_count'. Expecting value >= -1, got:-2",
        ),
        (
            {"log_frequency": "-1"},
            InvalidInput,
            "Unable to parse 'log_frequency', value is out of range",
        ),
        ({"trace_level": ["TENSORS"]}, Unsupported, "trace level TENSORS is not implemented"),
        ({"trace_level": ["LOUD"]}, InvalidInput, "expected OFF, TIMESTAMPS or TENSORS"),
        ({"trace_mode": "triton"}, InvalidInput, "'opentelemetry' mode only"),
        ({"trace_colour": "1"}, InvalidInput, "unknown trace setting 'trace_colour'"),
    ],
)
def test_bad_changes_are_refused_whole_in_tritons_words(changes, error, text):
    control = TraceControl(ON)
    with pytest.raises(error) as raised:
        control.update("", {"trace_rate": "7", **changes})
    assert text in str(raised.value)
    assert control.settings()["trace_rate"] == "1"  # nothing applied


def test_turning_tracing_on_needs_somewhere_to_send_the_spans():
    control = TraceControl()  # no exporter: OFF
    assert control.settings()["trace_level"] == ["OFF"]
    with pytest.raises(InvalidInput, match="nowhere to send traces"):
        control.update("m", {"trace_level": ["TIMESTAMPS"]})
    control.update("", {"trace_rate": "5"})  # other settings are fine


def test_state_travels_to_another_processes_copy():
    control = TraceControl(ON)
    control.update("", {"trace_rate": "4"})
    control.update("m", {"trace_level": ["OFF"]})
    copy = TraceControl(ON)
    copy.restore(control.state())
    assert copy.settings() == control.settings() and copy.settings("m") == control.settings("m")


def test_trace_config_flags_as_tritons_scripts_pass_them():
    setup = trace_setup(
        configs=(
            "mode=opentelemetry",
            "opentelemetry,url=localhost:4318/v1/traces",
            "opentelemetry,resource=test.key=test.value",
            "opentelemetry,bsp_max_queue_size=1",
            "level=TIMESTAMPS",
            "rate=5",
            "count=-1",
        ),
        env={},
    )
    assert setup.otlp_endpoint == "http://localhost:4318/v1/traces"
    assert setup.resource == {"test.key": "test.value"}
    assert setup.batch == {
        "bsp_max_queue_size": 1,
        "bsp_schedule_delay": 5000,
        "bsp_max_export_batch_size": 512,
    }
    assert setup.defaults.values == TraceValues(("TIMESTAMPS",), 5, -1, 0)
    # Triton's default: tracing starts OFF unless level says otherwise.
    assert trace_setup(configs=("mode=opentelemetry",), env={}).defaults.values.level == ("OFF",)
    assert trace_setup(configs=("mode=opentelemetry",), env={}).otlp_endpoint.endswith(":4318/v1/traces")
    # Convoy's own flags trace every request.
    assert trace_setup(console=True).defaults.values.level == ("TIMESTAMPS",)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ("mode=triton", "opentelemetry mode only"),
        ("triton,file=trace.json", "opentelemetry mode only"),
        ("level=TENSORS", "TENSORS is not implemented"),
        ("rate=often", "expected an integer"),
        ("opentelemetry,colour=blue", "unknown opentelemetry setting 'colour'"),
        ("bogus", "expected [<mode>,]<setting>=<value>"),
    ],
)
def test_trace_config_values_it_cannot_honour_are_refused(config, words):
    with pytest.raises(ValueError) as raised:
        trace_setup(configs=(config,), env={})
    assert words in str(raised.value)
