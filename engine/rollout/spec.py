"""What a roll-out is asked to do: `RolloutSpec`, parsed from `<model>/rollout.json` or the admin
API's JSON body, every field checked with a message naming it.

{
  "stable": 1, "candidate": 2,             versions (required; a template with new_versions omits them)
  "mode": "canary",                        shadow | canary | ab
  "steps": ["shadow", 1, 10, 50, 100],     "shadow", a candidate percentage, or an object
                                           {"candidate": 10, "stable": 90, "bake_seconds": 30}
  "bake_seconds": 60,                      per step (a step object may set its own)
  "max_step_seconds": 0,                   a step still short of samples after this rolls back (0: waits)
  "guards": {"max_p99_ratio": 1.5, "max_error_rate_delta": 0.01, "min_agreement": 0.99,
             "min_samples": 100},          any guard null: off
  "mirror": {"sample_rate": 1.0, "budget": 0.25, "max_queue": 0},
  "compare": {"sample_rate": 0.1, "atol": 1e-5, "rtol": 1e-4, "min_cosine": 0.999,
              "log_disagreements": 1.0,
              "outputs": {"LOGITS": {"kind": "logits", "top_k": 5}}},
  "split": {"header": "x-user-id"},        default: the API key
  "ab": {"metric": "latency", "alpha": 0.05, "max_seconds": 0, "on_tie": "stable"},
  "auto_promote": true, "keep_previous_seconds": 300, "on_restart": "resume",
  "new_versions": "replace"                rollout.json only: "candidate" makes a version folder
                                           poll finds the candidate of a roll-out like this one
}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from convoy.config import ModelConfig
from convoy.errors import InvalidInput

MODES = ("shadow", "canary", "ab")
#: Default steps per mode.
DEFAULT_STEPS: dict[str, tuple[str | int, ...]] = {
    "shadow": ("shadow",),
    "canary": ("shadow", 1, 10, 50, 100),
    "ab": (50,),
}
#: How an output's pair is compared (see compare.py); the default follows its datatype.
OUTPUT_KINDS = ("exact", "float", "logits", "probabilities", "embedding")
FLOAT_DATATYPES = ("FP16", "FP32", "FP64", "BF16")
AB_METRICS = ("latency", "error_rate")
#: A header name as HTTP (RFC 9110 token) and gRPC metadata (lower case) both allow it.
_HEADER = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
#: gRPC and HTTP carry these themselves; a roll-out cannot split on them.
_RESERVED_HEADERS = ("authorization", "content-type", "content-length", "te", "host")


@dataclass(frozen=True, slots=True)
class Step:
    """One step: the candidate's share of client traffic (0 in a shadow step, where it only
    receives mirrored copies) and how long it bakes before its guards may advance it."""

    candidate_percent: float
    bake_seconds: float
    shadow: bool = False

    @property
    def label(self) -> str:
        return "shadow" if self.shadow else f"{self.candidate_percent:g}%"


@dataclass(frozen=True, slots=True)
class Guards:
    """A step advances after its bake time only while every guard holds; a breach (with at
    least `min_samples` behind it) rolls back at once. None: that guard is off."""

    max_p99_ratio: float | None = 1.5
    max_error_rate_delta: float | None = 0.01
    min_agreement: float | None = 0.99
    min_samples: int = 100


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    """Shadow traffic: the share of requests mirrored to the candidate in a shadow step, the
    share of the target version's instance time mirrors may use, and the most mirrors queued or
    running on it at once (0: two batches' worth per instance)."""

    sample_rate: float = 1.0
    budget: float = 0.25
    max_queue: int = 0


@dataclass(frozen=True, slots=True)
class OutputCompare:
    """How one output's pairs are judged: `kind` (compare.py), top-k for logits and
    probabilities along `axis`, tolerances for floats, the cosine bar for embeddings."""

    kind: str
    top_k: int = 5
    axis: int = -1
    atol: float = 1e-5
    rtol: float = 1e-4
    min_cosine: float = 0.999


@dataclass(frozen=True, slots=True)
class ComparePolicy:
    """Paired comparison: in canary and A/B steps `sample_rate` of the requests the candidate
    answers are also run on stable (in shadow steps every mirrored request is a pair);
    disagreeing pairs go to the payload log at `log_disagreements` (with --payload-log-dir)."""

    sample_rate: float = 0.1
    outputs: dict[str, OutputCompare] = field(default_factory=dict)
    log_disagreements: float = 1.0
    #: Defaults for the outputs `outputs` does not name.
    atol: float = 1e-5
    rtol: float = 1e-4
    min_cosine: float = 0.999


@dataclass(frozen=True, slots=True)
class AbTest:
    """An A/B step ends with a test on `metric` (Mann-Whitney U on latency, a two-proportion z
    test on error rate): p < alpha names the winner; otherwise it keeps collecting until
    `max_seconds` (0: ten bake times) and then `on_tie` wins."""

    metric: str = "latency"
    alpha: float = 0.05
    max_seconds: float = 0.0
    on_tie: str = "stable"


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    stable: int | None
    candidate: int | None
    mode: str
    steps: tuple[Step, ...]
    guards: Guards
    mirror: MirrorPolicy
    compare: ComparePolicy
    #: Header (lower case) whose value splits callers; "" splits by API key.
    split_header: str = ""
    ab: AbTest = AbTest()
    auto_promote: bool = True
    keep_previous_seconds: float = 300.0
    #: What a restart mid-roll-out does (with --rollout-state): "resume" or "abort".
    on_restart: str = "resume"
    max_step_seconds: float = 0.0
    #: rollout.json only: "candidate" makes a new version folder (poll) the candidate.
    new_versions: str = "replace"
    #: The document it was parsed from (kept for the state file and the report).
    document: dict[str, Any] = field(default_factory=dict, compare=False)

    def describe(self) -> dict[str, Any]:
        """The spec as the status and report show it."""
        out = asdict(self)
        out.pop("document")
        out["steps"] = [
            {"label": s.label, "candidate_percent": s.candidate_percent, "bake_seconds": s.bake_seconds}
            for s in self.steps
        ]
        return out


# --- parsing --------------------------------------------------------------------------------------
class _Fields:
    """A JSON object being read: each field taken once; what is left over is refused."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise InvalidInput(f"{where or 'rollout'}: expected a JSON object, got {_kind(value)}")
        self.value = dict(value)
        self.where = where

    def path(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def take(self, name: str, default: Any = None) -> Any:
        return self.value.pop(name, default)

    def done(self, known: tuple[str, ...]) -> None:
        for name in self.value:
            raise InvalidInput(f"{self.path(name)}: unknown field (expected one of {', '.join(known)})")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false"}.get(
        type(value), "null" if value is None else "a number"
    )


def _number(value: Any, where: str, low: float, high: float, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"{where}: expected a number, got {_kind(value)}")
    if value < low or value > high or (open_low and value == low):
        bound = f"({low:g}" if open_low else f"[{low:g}"
        raise InvalidInput(f"{where}: expected a number in {bound}, {high:g}], got {value:g}")
    return float(value)


def _integer(value: Any, where: str, low: int, high: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{where}: expected a whole number, got {_kind(value)} {value!r}"[:200])
    if not low <= value <= high:
        raise InvalidInput(f"{where}: expected a whole number from {low}, got {value}")
    return value


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidInput(f"{where}: expected one of {', '.join(choices)}, got {value!r}"[:300])
    chosen: str = value  # one of `choices`
    return chosen


def _optional(
    fields: _Fields, name: str, default: float | None, read: Callable[[Any, str], float]
) -> float | None:
    """A guard: absent -> its default, null -> off, else `read(value, path)`."""
    if name not in fields.value:
        return default
    value = fields.take(name)
    return None if value is None else read(value, fields.path(name))


def parse_spec(document: Any, template: bool = False) -> RolloutSpec:
    """A RolloutSpec from JSON, or InvalidInput naming the field that is wrong. `template`: the
    versions may be left out (a rollout.json with new_versions: candidate)."""
    fields = _Fields(document, "")
    original = dict(fields.value)
    stable = fields.take("stable")
    candidate = fields.take("candidate")
    new_versions = _choice(
        fields.take("new_versions", "replace"), "new_versions", ("replace", "candidate")
    )
    if stable is None and candidate is None and (template or new_versions == "candidate"):
        pass
    else:
        stable = _integer(stable, "stable", 0) if stable is not None else _missing("stable")
        candidate = (
            _integer(candidate, "candidate", 0) if candidate is not None else _missing("candidate")
        )
        if stable == candidate:
            raise InvalidInput(f"candidate: version {candidate} is also the stable version")
    mode = _choice(fields.take("mode", "canary"), "mode", MODES)
    bake = _number(fields.take("bake_seconds", 60), "bake_seconds", 0, 86400 * 30, open_low=True)
    steps = _steps(fields.take("steps", list(DEFAULT_STEPS[mode])), mode, bake)
    guards = _guards(fields.take("guards", {}), mode)
    mirror = _mirror(fields.take("mirror", {}))
    compare = _compare(fields.take("compare", {}))
    split = _Fields(fields.take("split", {}), "split")
    header = split.take("header", "")
    split.done(("header",))
    if header != "":
        if not isinstance(header, str) or not _HEADER.fullmatch(header.lower()):
            raise InvalidInput(f"split.header: expected an HTTP header name, got {header!r}"[:200])
        header = header.lower()
        if header in _RESERVED_HEADERS or header.startswith(("grpc-", ":")):
            raise InvalidInput(f"split.header: '{header}' is a transport header; name your own")
    ab = _ab(fields.take("ab", {}))
    auto_promote = fields.take("auto_promote", True)
    if not isinstance(auto_promote, bool):
        raise InvalidInput(f"auto_promote: expected true or false, got {_kind(auto_promote)}")
    keep = _number(fields.take("keep_previous_seconds", 300), "keep_previous_seconds", 0, 86400 * 365)
    on_restart = _choice(fields.take("on_restart", "resume"), "on_restart", ("resume", "abort"))
    max_step = _number(fields.take("max_step_seconds", 0), "max_step_seconds", 0, 86400 * 365)
    fields.done(
        (
            "stable",
            "candidate",
            "mode",
            "steps",
            "bake_seconds",
            "max_step_seconds",
            "guards",
            "mirror",
            "compare",
            "split",
            "ab",
            "auto_promote",
            "keep_previous_seconds",
            "on_restart",
            "new_versions",
        )
    )
    if max_step and any(step.bake_seconds > max_step for step in steps):
        raise InvalidInput(
            f"max_step_seconds: {max_step:g} is shorter than a step's bake time "
            f"({max(s.bake_seconds for s in steps):g} s)"
        )
    return RolloutSpec(
        stable=stable,
        candidate=candidate,
        mode=mode,
        steps=steps,
        guards=guards,
        mirror=mirror,
        compare=compare,
        split_header=header,
        ab=ab,
        auto_promote=auto_promote,
        keep_previous_seconds=keep,
        on_restart=on_restart,
        max_step_seconds=max_step,
        new_versions=new_versions,
        document=original,
    )


def _missing(name: str) -> NoReturn:
    raise InvalidInput(f"{name}: required (the model version number)")


def _steps(value: Any, mode: str, default_bake: float) -> tuple[Step, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"steps: expected a non-empty list, got {_kind(value)}")
    if len(value) > 100:
        raise InvalidInput(f"steps: expected at most 100 steps, got {len(value)}")
    steps: list[Step] = []
    for index, item in enumerate(value):
        where = f"steps[{index}]"
        bake = default_bake
        if isinstance(item, dict):
            fields = _Fields(item, where)
            bake = _number(
                fields.take("bake_seconds", default_bake),
                f"{where}.bake_seconds",
                0,
                86400 * 30,
                open_low=True,
            )
            shadow = fields.take("shadow", False)
            if not isinstance(shadow, bool):
                raise InvalidInput(f"{where}.shadow: expected true or false, got {_kind(shadow)}")
            candidate = fields.take("candidate")
            stable = fields.take("stable")
            fields.done(("candidate", "stable", "shadow", "bake_seconds"))
            if shadow:
                if candidate not in (None, 0) or stable not in (None, 100):
                    raise InvalidInput(f"{where}: a shadow step serves no client from the candidate")
                item = "shadow"
            else:
                if candidate is None:
                    raise InvalidInput(f"{where}.candidate: required (the candidate's percentage)")
                share = _number(candidate, f"{where}.candidate", 0, 100, open_low=True)
                if stable is not None:
                    rest = _number(stable, f"{where}.stable", 0, 100)
                    if abs(rest + share - 100) > 1e-9:
                        raise InvalidInput(
                            f"{where}: weights stable {rest:g} + candidate {share:g} = "
                            f"{rest + share:g}; expected them to sum to 100"
                        )
                item = share
        if item == "shadow":
            if steps and not steps[-1].shadow:
                raise InvalidInput(
                    f"{where}: a shadow step can only come first, before any weighted step"
                )
            if steps:
                raise InvalidInput(f"{where}: one shadow step is enough (give it a longer bake_seconds)")
            steps.append(Step(0.0, bake, shadow=True))
            continue
        if isinstance(item, str):
            raise InvalidInput(
                f'{where}: expected "shadow", a percentage or an object, got {item!r}'[:200]
            )
        share = _number(item, where, 0, 100, open_low=True)
        if steps and not steps[-1].shadow and share <= steps[-1].candidate_percent:
            raise InvalidInput(
                f"{where}: steps out of order: {share:g}% after {steps[-1].candidate_percent:g}%; "
                "expected the candidate's share to grow at every step"
            )
        steps.append(Step(share, bake))
    weighted = [s for s in steps if not s.shadow]
    if mode == "shadow" and weighted:
        raise InvalidInput(
            "steps: mode shadow serves no client from the candidate before promotion; expected "
            '["shadow"] (use mode canary for weighted steps)'
        )
    if mode == "ab":
        if len(weighted) != 1:
            raise InvalidInput(
                f"steps: mode ab splits traffic once; expected one weighted step (optionally after "
                f"a shadow step), got {len(weighted)}"
            )
        if weighted[0].candidate_percent >= 100:
            raise InvalidInput("steps: an A/B split needs traffic on both arms; expected below 100")
    if mode == "canary" and not weighted:
        raise InvalidInput("steps: mode canary needs a weighted step (use mode shadow for shadow only)")
    return tuple(steps)


def _guards(value: Any, mode: str) -> Guards:
    fields = _Fields(value, "guards")
    ratio = _optional(fields, "max_p99_ratio", 1.5, lambda v, w: _number(v, w, 0, 1e6, open_low=True))
    delta = _optional(fields, "max_error_rate_delta", 0.01, lambda v, w: _number(v, w, 0, 1))
    # An A/B candidate may differ from stable on purpose: agreement is off unless asked for.
    agreement_default = None if mode == "ab" else 0.99
    agreement = _optional(fields, "min_agreement", agreement_default, lambda v, w: _number(v, w, 0, 1))
    samples = _integer(fields.take("min_samples", 100), "guards.min_samples", 1, 10_000_000)
    fields.done(("max_p99_ratio", "max_error_rate_delta", "min_agreement", "min_samples"))
    return Guards(ratio, delta, agreement, samples)


def _mirror(value: Any) -> MirrorPolicy:
    fields = _Fields(value, "mirror")
    rate = _number(fields.take("sample_rate", 1.0), "mirror.sample_rate", 0, 1)
    budget = _number(fields.take("budget", 0.25), "mirror.budget", 0, 1, open_low=True)
    queue = _integer(fields.take("max_queue", 0), "mirror.max_queue", 0, 1_000_000)
    fields.done(("sample_rate", "budget", "max_queue"))
    return MirrorPolicy(rate, budget, queue)


def _compare(value: Any) -> ComparePolicy:
    fields = _Fields(value, "compare")
    rate = _number(fields.take("sample_rate", 0.1), "compare.sample_rate", 0, 1)
    atol = _number(fields.take("atol", 1e-5), "compare.atol", 0, 1e30)
    rtol = _number(fields.take("rtol", 1e-4), "compare.rtol", 0, 1e30)
    cosine = _number(fields.take("min_cosine", 0.999), "compare.min_cosine", -1, 1)
    log_rate = _number(fields.take("log_disagreements", 1.0), "compare.log_disagreements", 0, 1)
    outputs_value = fields.take("outputs", {})
    fields.done(("sample_rate", "atol", "rtol", "min_cosine", "log_disagreements", "outputs"))
    outputs_fields = _Fields(outputs_value, "compare.outputs")
    outputs = {}
    for name in list(outputs_fields.value):
        entry = _Fields(outputs_fields.take(name), f"compare.outputs.{name}")
        kind = _choice(entry.take("kind", "float"), entry.path("kind"), OUTPUT_KINDS)
        top_k = _integer(entry.take("top_k", 5), entry.path("top_k"), 1, 1_000_000)
        axis = _integer(entry.take("axis", -1), entry.path("axis"), -64, 63)
        out_atol = _number(entry.take("atol", atol), entry.path("atol"), 0, 1e30)
        out_rtol = _number(entry.take("rtol", rtol), entry.path("rtol"), 0, 1e30)
        out_cosine = _number(entry.take("min_cosine", cosine), entry.path("min_cosine"), -1, 1)
        entry.done(("kind", "top_k", "axis", "atol", "rtol", "min_cosine"))
        outputs[name] = OutputCompare(kind, top_k, axis, out_atol, out_rtol, out_cosine)
    return ComparePolicy(rate, outputs, log_rate, atol, rtol, cosine)


def _ab(value: Any) -> AbTest:
    fields = _Fields(value, "ab")
    metric = _choice(fields.take("metric", "latency"), "ab.metric", AB_METRICS)
    alpha = _number(fields.take("alpha", 0.05), "ab.alpha", 0, 0.5, open_low=True)
    max_seconds = _number(fields.take("max_seconds", 0), "ab.max_seconds", 0, 86400 * 365)
    on_tie = _choice(fields.take("on_tie", "stable"), "ab.on_tie", ("stable", "candidate"))
    fields.done(("metric", "alpha", "max_seconds", "on_tie"))
    return AbTest(metric, alpha, max_seconds, on_tie)


def output_rules(spec: RolloutSpec, config: ModelConfig) -> dict[str, OutputCompare]:
    """Every declared output's comparison: as the spec names it, else by datatype (floats within
    tolerance, everything else exactly). An output the spec names that the model lacks, or a
    float kind on a non-float output, is refused naming it."""
    compare = spec.compare
    declared = {s.name: s.datatype for s in config.outputs}
    for name, rule in compare.outputs.items():
        if name not in declared:
            raise InvalidInput(
                f"compare.outputs.{name}: model '{config.name}' has no such output "
                f"(outputs: {', '.join(declared) or 'none'})"
            )
        if rule.kind != "exact" and declared[name] not in FLOAT_DATATYPES:
            raise InvalidInput(
                f"compare.outputs.{name}.kind: '{rule.kind}' compares floats; output '{name}' is "
                f"{declared[name]} (use 'exact')"
            )
    atol, rtol, cosine = compare.atol, compare.rtol, compare.min_cosine
    rules = {}
    for name, datatype in declared.items():
        given = compare.outputs.get(name)
        if given is None:
            kind = "float" if datatype in FLOAT_DATATYPES else "exact"
            given = OutputCompare(kind, atol=atol, rtol=rtol, min_cosine=cosine)
        rules[name] = given
    return rules
