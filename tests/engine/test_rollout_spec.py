"""A roll-out spec (rollout.json or the admin API's body) is parsed once; anything wrong is
refused with a message naming the field and what was expected."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convoy.config import ModelConfig
from convoy.engine.rollout.spec import output_rules, parse_spec
from convoy.errors import InvalidInput
from convoy.types import TensorSpec


def test_defaults_are_a_canary_from_shadow_to_all_traffic():
    spec = parse_spec({"stable": 1, "candidate": 2})
    assert spec.mode == "canary"
    assert [s.label for s in spec.steps] == ["shadow", "1%", "10%", "50%", "100%"]
    assert all(s.bake_seconds == 60 for s in spec.steps)
    assert spec.guards.min_agreement == 0.99 and spec.guards.max_p99_ratio == 1.5
    assert spec.on_restart == "resume" and spec.auto_promote


def test_an_ab_roll_out_splits_once_and_does_not_guard_agreement_by_default():
    spec = parse_spec({"stable": 1, "candidate": 2, "mode": "ab"})
    assert [s.candidate_percent for s in spec.steps] == [50]
    assert spec.guards.min_agreement is None
    assert spec.ab.metric == "latency"


def test_steps_may_be_objects_with_their_own_bake_time_and_both_weights():
    spec = parse_spec(
        {
            "stable": 3,
            "candidate": 4,
            "bake_seconds": 10,
            "steps": [{"shadow": True, "bake_seconds": 5}, {"stable": 90, "candidate": 10}, 100],
        }
    )
    assert [(s.label, s.bake_seconds) for s in spec.steps] == [("shadow", 5), ("10%", 10), ("100%", 10)]


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"candidate": 2}, "stable: required"),
        ({"stable": 1}, "candidate: required"),
        ({"stable": 1, "candidate": 1}, "candidate: version 1 is also the stable version"),
        ({"stable": "1", "candidate": 2}, "stable: expected a whole number"),
        ({"stable": -1, "candidate": 2}, "stable: expected a whole number from 0"),
        ({"stable": 1, "candidate": 2, "steps": [10, 5]}, "steps[1]: steps out of order: 5% after 10%"),
        ({"stable": 1, "candidate": 2, "steps": [10, 10]}, "steps[1]: steps out of order"),
        (
            {"stable": 1, "candidate": 2, "steps": [10, "shadow"]},
            "steps[1]: a shadow step can only come first",
        ),
        ({"stable": 1, "candidate": 2, "steps": [0]}, "steps[0]: expected a number in (0, 100]"),
        ({"stable": 1, "candidate": 2, "steps": [150]}, "steps[0]: expected a number in (0, 100]"),
        ({"stable": 1, "candidate": 2, "steps": []}, "steps: expected a non-empty list"),
        (
            {"stable": 1, "candidate": 2, "steps": [{"stable": 80, "candidate": 30}]},
            "steps[0]: weights stable 80 + candidate 30 = 110; expected them to sum to 100",
        ),
        ({"stable": 1, "candidate": 2, "steps": [{"stable": 80}]}, "steps[0].candidate: required"),
        (
            {"stable": 1, "candidate": 2, "steps": [{"candidate": 5, "weight": 1}]},
            "steps[0].weight: unknown field",
        ),
        (
            {"stable": 1, "candidate": 2, "mode": "blue-green"},
            "mode: expected one of shadow, canary, ab",
        ),
        (
            {"stable": 1, "candidate": 2, "mode": "shadow", "steps": ["shadow", 10]},
            "steps: mode shadow serves no client",
        ),
        (
            {"stable": 1, "candidate": 2, "mode": "ab", "steps": [10, 20]},
            "steps: mode ab splits traffic once",
        ),
        (
            {"stable": 1, "candidate": 2, "mode": "ab", "steps": [100]},
            "steps: an A/B split needs traffic on both arms",
        ),
        (
            {"stable": 1, "candidate": 2, "mode": "canary", "steps": ["shadow"]},
            "steps: mode canary needs a weighted step",
        ),
        ({"stable": 1, "candidate": 2, "bake_seconds": 0}, "bake_seconds: expected a number in (0,"),
        (
            {"stable": 1, "candidate": 2, "guards": {"min_agreement": 1.5}},
            "guards.min_agreement: expected a number in [0, 1]",
        ),
        (
            {"stable": 1, "candidate": 2, "guards": {"min_samples": 0}},
            "guards.min_samples: expected a whole number from 1",
        ),
        ({"stable": 1, "candidate": 2, "guards": {"p99": 2}}, "guards.p99: unknown field"),
        (
            {"stable": 1, "candidate": 2, "mirror": {"budget": 0}},
            "mirror.budget: expected a number in (0, 1]",
        ),
        (
            {"stable": 1, "candidate": 2, "split": {"header": "bad header"}},
            "split.header: expected an HTTP header name",
        ),
        (
            {"stable": 1, "candidate": 2, "split": {"header": "Authorization"}},
            "split.header: 'authorization' is a transport header",
        ),
        (
            {"stable": 1, "candidate": 2, "ab": {"metric": "revenue"}},
            "ab.metric: expected one of latency, error_rate",
        ),
        (
            {"stable": 1, "candidate": 2, "on_restart": "retry"},
            "on_restart: expected one of resume, abort",
        ),
        ({"stable": 1, "candidate": 2, "canary": True}, "canary: unknown field"),
        (
            {"stable": 1, "candidate": 2, "compare": {"outputs": {"Y": {"kind": "fuzzy"}}}},
            "compare.outputs.Y.kind: expected one of",
        ),
        (
            {"stable": 1, "candidate": 2, "bake_seconds": 10, "max_step_seconds": 5},
            "max_step_seconds: 5 is shorter",
        ),
        ([1, 2], "rollout: expected a JSON object, got a list"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(document, field):
    with pytest.raises(InvalidInput) as refused:
        parse_spec(document)
    assert field in str(refused.value)


def _config(*outputs: tuple[str, str]) -> ModelConfig:
    return ModelConfig(
        name="m",
        backend="python",
        max_batch_size=8,
        inputs=(TensorSpec("X", "FP32", (4,)),),
        outputs=tuple(TensorSpec(name, datatype, (4,)) for name, datatype in outputs),
    )


def test_outputs_get_rules_by_datatype_unless_the_spec_names_them():
    spec = parse_spec(
        {"stable": 1, "candidate": 2, "compare": {"outputs": {"LOGITS": {"kind": "logits", "top_k": 3}}}}
    )
    rules = output_rules(spec, _config(("LOGITS", "FP32"), ("EMB", "FP16"), ("LABEL", "INT64")))
    assert (rules["LOGITS"].kind, rules["LOGITS"].top_k) == ("logits", 3)
    assert rules["EMB"].kind == "float"
    assert rules["LABEL"].kind == "exact"


def test_an_output_the_model_lacks_or_a_float_rule_on_integers_is_refused():
    config = _config(("LABEL", "INT64"))
    with pytest.raises(InvalidInput, match=r"compare.outputs.NOPE: model 'm' has no such output"):
        output_rules(
            parse_spec({"stable": 1, "candidate": 2, "compare": {"outputs": {"NOPE": {}}}}), config
        )
    spec = parse_spec(
        {"stable": 1, "candidate": 2, "compare": {"outputs": {"LABEL": {"kind": "embedding"}}}}
    )
    with pytest.raises(InvalidInput, match=r"compare.outputs.LABEL.kind: 'embedding' compares floats"):
        output_rules(spec, config)


def test_a_template_names_no_versions():
    spec = parse_spec({"new_versions": "candidate", "mode": "shadow"}, template=True)
    assert spec.stable is None and spec.candidate is None and spec.new_versions == "candidate"


@given(st.lists(st.floats(0.5, 100, allow_nan=False), min_size=1, max_size=8))
def test_any_steps_accepted_grow_strictly_and_any_refused_do_not(shares):
    document = {"stable": 1, "candidate": 2, "steps": shares}
    growing = all(b > a for a, b in itertools.pairwise(shares))
    if growing:
        spec = parse_spec(document)
        assert [s.candidate_percent for s in spec.steps] == shares
    else:
        with pytest.raises(InvalidInput, match=r"steps\[\d+\]: steps out of order"):
            parse_spec(document)
