"""The Admin API's input contract (controlplane/validation.py) as tables of cases: every bad input
is InvalidArgument with a message naming the field and the rule; good input passes (a spec comes
back normalised, the request itself untouched). Pure, fast; the live servicer is fuzzed in
tests/fuzz/test_admin.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.controlplane.validation import (
    MAX_COPIES,
    MAX_FEEDBACK_ITEMS,
    MAX_PROFILE_BINS,
    check_model_name,
    check_name,
    validate_alias_change,
    validate_feedback,
    validate_policy,
    validate_profile,
    validate_rollout,
    validate_spec,
    validate_switching,
)
from meshserve.protos import mesh_pb2

SHA = "ab" * 32


def spec(**fields: object) -> mesh_pb2.ModelSpec:
    """A valid spec with ``fields`` changed (nested messages as dicts)."""
    base: dict[str, object] = {
        "name": "mlp",
        "variant": "v1",
        "artifact_uri": "file:///models/mlp.onnx",
        "sha256": SHA,
        "copies": 2,
    }
    base.update(fields)
    return mesh_pb2.ModelSpec(**base)  # type: ignore[arg-type]


def sketch(edges: list[float], counts: list[int], name: str = "s") -> mesh_pb2.Sketch:
    return mesh_pb2.Sketch(name=name, edges=edges, counts=counts)


def profile(features: int = 1, **fields: object) -> mesh_pb2.DriftProfile:
    out = mesh_pb2.DriftProfile(input="x", output=sketch([0.5], [3, 4], "out"))
    out.features.extend(sketch([0.0, 1.0], [1, 2, 3], f"f{i}") for i in range(features))
    for name, value in fields.items():
        if isinstance(value, mesh_pb2.Sketch):
            getattr(out, name).CopyFrom(value)
        else:
            setattr(out, name, value)
    return out


@dataclass(frozen=True)
class Case:
    title: str
    check: Callable[[], object]
    error: str | None  # a fragment of the InvalidArgument message; None: accepted


def _ids(cases: list[Case]) -> list[str]:
    return [c.title for c in cases]


def _run(case: Case) -> None:
    if case.error is None:
        case.check()
        return
    with pytest.raises(InvalidArgument) as info:
        case.check()
    assert case.error in str(info.value), str(info.value)


SPECS = [
    Case("a plain spec is accepted", lambda: validate_spec(spec()), None),
    Case(
        "a name of 128 characters of the allowed set is accepted",
        lambda: validate_spec(spec(name="a" + "b._-" * 31 + "xyz")),
        None,
    ),
    Case(
        "an empty name is refused, with the rule",
        lambda: validate_spec(spec(name="")),
        "invalid model name '': 1-128 of [A-Za-z0-9_.-], starting with a letter or digit",
    ),
    Case(
        "a name of 129 characters is refused",
        lambda: validate_spec(spec(name="x" * 129)),
        "invalid model name",
    ),
    Case(
        "a name that climbs out of a folder is refused",
        lambda: validate_spec(spec(name="../x")),
        "invalid model name '../x'",
    ),
    Case(
        "a name starting with a dot is refused",
        lambda: validate_spec(spec(name=".hidden")),
        "invalid model name",
    ),
    Case(
        "a variant with a slash is refused, named as the variant",
        lambda: validate_spec(spec(variant="a/b")),
        "invalid model variant 'a/b'",
    ),
    Case(
        "a non-ASCII variant is refused",
        lambda: validate_spec(spec(variant="é")),
        "invalid model variant",
    ),
    Case(
        "a version with a slash is refused, named as the version",
        lambda: validate_spec(spec(version="v/2")),
        "invalid model version 'v/2'",
    ),
    Case(
        "an ftp artifact is refused, naming the schemes allowed",
        lambda: validate_spec(spec(artifact_uri="ftp://host/x.onnx")),
        "must be a file://, http:// or https:// URI",
    ),
    Case(
        "an artifact path without a scheme is refused",
        lambda: validate_spec(spec(artifact_uri="/models/x.onnx")),
        "artifact_uri '/models/x.onnx'",
    ),
    Case(
        "an https artifact is accepted",
        lambda: validate_spec(spec(artifact_uri="https://example.org/x.onnx")),
        None,
    ),
    Case(
        "a short sha256 is refused",
        lambda: validate_spec(spec(sha256="abc")),
        "sha256 'abc' is not 64 hex characters",
    ),
    Case(
        "a sha256 with a non-hex letter is refused",
        lambda: validate_spec(spec(sha256="g" * 64)),
        "is not 64 hex characters",
    ),
    Case(
        "copies over the limit are refused",
        lambda: validate_spec(spec(copies=MAX_COPIES + 1)),
        f"copies={MAX_COPIES + 1} is over the limit of {MAX_COPIES}",
    ),
    Case("copies at the limit are accepted", lambda: validate_spec(spec(copies=MAX_COPIES)), None),
    Case(
        "an unknown tensor datatype is refused, naming the tensor",
        lambda: validate_spec(spec(inputs=[{"name": "x", "datatype": "FLOAT"}])),
        "tensor 'x': unknown datatype 'FLOAT'",
    ),
    Case(
        "an unknown output datatype is refused too",
        lambda: validate_spec(spec(outputs=[{"name": "y", "datatype": ""}])),
        "tensor 'y': unknown datatype ''",
    ),
    Case(
        "OIP datatypes are accepted",
        lambda: validate_spec(
            spec(
                inputs=[{"name": "x", "datatype": "FP32"}],
                outputs=[{"name": "y", "datatype": "INT64"}],
            )
        ),
        None,
    ),
    Case("a NaN SLO is refused", lambda: validate_spec(spec(slo_ms=math.nan)), "slo_ms=nan"),
    Case("an infinite SLO is refused", lambda: validate_spec(spec(slo_ms=math.inf)), "slo_ms=inf"),
    Case("a negative SLO is refused", lambda: validate_spec(spec(slo_ms=-1.0)), "must be a finite"),
    Case(
        "an accuracy above 1 is refused",
        lambda: validate_spec(spec(accuracy=1.5)),
        "accuracy=1.5 must be between 0 and 1",
    ),
    Case(
        "a NaN accuracy is refused", lambda: validate_spec(spec(accuracy=math.nan)), "accuracy=nan"
    ),
    Case(
        "autoscaling over the copy limit is refused",
        lambda: validate_spec(spec(autoscaling={"max_copies": MAX_COPIES + 1})),
        f"autoscaling.max_copies={MAX_COPIES + 1} is over {MAX_COPIES}",
    ),
    Case(
        "autoscaling with a minimum above its maximum is refused",
        lambda: validate_spec(spec(autoscaling={"min_copies": 3, "max_copies": 2})),
        "autoscaling.min_copies=3 exceeds max_copies=2",
    ),
    Case(
        "autoscaling with a minimum and no maximum is accepted",
        lambda: validate_spec(spec(autoscaling={"min_copies": 3})),
        None,
    ),
    Case(
        "autoscaling with a NaN target is refused",
        lambda: validate_spec(spec(autoscaling={"target_in_flight": math.nan})),
        "autoscaling.target_in_flight must be >= 0",
    ),
    Case(
        "a log sample rate above 1 is refused",
        lambda: validate_spec(spec(serving={"monitoring": {"log_sample_rate": 2.0}})),
        "monitoring.log_sample_rate=2.0 must be between 0 and 1",
    ),
    Case(
        "a malformed drift reference is refused as a profile",
        lambda: validate_spec(spec(drift_reference=profile(input=""))),
        "drift profile has features but names no input tensor",
    ),
    Case(
        "a well-formed drift reference is accepted",
        lambda: validate_spec(spec(drift_reference=profile())),
        None,
    ),
]


@pytest.mark.parametrize("case", SPECS, ids=_ids(SPECS))
def test_validate_spec(case: Case) -> None:
    _run(case)


def test_a_spec_comes_back_normalised_and_the_request_is_untouched() -> None:
    sent = spec(variant="", sha256=SHA.upper(), copies=0)
    out = validate_spec(sent)
    assert (out.variant, out.sha256, out.copies) == ("default", SHA, 1)
    assert (sent.variant, sent.sha256, sent.copies) == ("", SHA.upper(), 0)


def test_a_versioned_spec_without_a_variant_names_it_after_the_version() -> None:
    assert validate_spec(spec(variant="", version="v2")).variant == "v2"
    assert validate_spec(spec(variant="v2-int8", version="v2")).variant == "v2-int8"
    assert validate_spec(spec(variant="")).version == "", "no version: the implicit one"


PROFILES = [
    Case(
        "a profile of one feature and an output is accepted",
        lambda: validate_profile(profile()),
        None,
    ),
    Case("an empty profile is accepted", lambda: validate_profile(mesh_pb2.DriftProfile()), None),
    Case(
        "more features than sketches keep is refused",
        lambda: validate_profile(profile(features=257)),
        "drift profile has 257 features; at most 256",
    ),
    Case(
        "features without an input tensor are refused",
        lambda: validate_profile(profile(input="")),
        "names no input tensor",
    ),
    Case(
        "a sketch with as many edges as the bin limit is refused",
        lambda: validate_profile(
            profile(output=sketch([float(i) for i in range(MAX_PROFILE_BINS)], [1] * 65, "big"))
        ),
        "drift profile sketch 'big' has too many bins",
    ),
    Case(
        "a sketch with more counts than classes and bins is refused",
        lambda: validate_profile(profile(output=sketch([], [1] * 129, "wide"))),
        "drift profile sketch 'wide' has too many bins",
    ),
    Case(
        "a class histogram (counts, no edges) within the limit is accepted",
        lambda: validate_profile(profile(output=sketch([], [1] * 10, "classes"))),
        None,
    ),
    Case(
        "a NaN edge is refused",
        lambda: validate_profile(profile(output=sketch([math.nan], [1, 1], "o"))),
        "drift profile sketch 'o': edges must be finite and increasing",
    ),
    Case(
        "edges out of order are refused",
        lambda: validate_profile(profile(output=sketch([2.0, 1.0], [1, 1, 1], "o"))),
        "edges must be finite and increasing",
    ),
    Case(
        "a repeated edge is refused",
        lambda: validate_profile(profile(output=sketch([1.0, 1.0], [1, 1, 1], "o"))),
        "edges must be finite and increasing",
    ),
    Case(
        "edges and counts that disagree are refused, with both numbers",
        lambda: validate_profile(profile(output=sketch([0.0, 1.0], [1, 2], "o"))),
        "drift profile sketch 'o': 2 edges need 3 counts, got 2",
    ),
]


@pytest.mark.parametrize("case", PROFILES, ids=_ids(PROFILES))
def test_validate_profile(case: Case) -> None:
    _run(case)


def feedback(model: str = "mlp", *items: mesh_pb2.FeedbackItem) -> mesh_pb2.FeedbackRequest:
    return mesh_pb2.FeedbackRequest(model=model, items=items)


LABEL = mesh_pb2.FeedbackItem(request_id="r1", label=3)

FEEDBACK = [
    Case("a label is accepted", lambda: validate_feedback(feedback("mlp", LABEL)), None),
    Case(
        "a finite value is accepted",
        lambda: validate_feedback(
            feedback("mlp", mesh_pb2.FeedbackItem(request_id="r", value=0.5))
        ),
        None,
    ),
    Case(
        "feedback without a model is refused",
        lambda: validate_feedback(feedback("", LABEL)),
        "feedback needs the model name",
    ),
    Case(
        "feedback without items is refused", lambda: validate_feedback(feedback("mlp")), "no items"
    ),
    Case(
        "more items than one call carries are refused, with the limit",
        lambda: validate_feedback(feedback("mlp", *[LABEL] * (MAX_FEEDBACK_ITEMS + 1))),
        f"{MAX_FEEDBACK_ITEMS + 1} feedback items; send at most {MAX_FEEDBACK_ITEMS} per call",
    ),
    Case(
        "an item without a request id is refused",
        lambda: validate_feedback(feedback("mlp", mesh_pb2.FeedbackItem(label=1))),
        "a feedback item has an empty request_id",
    ),
    Case(
        "an item with neither label nor value is refused, naming it",
        lambda: validate_feedback(feedback("mlp", mesh_pb2.FeedbackItem(request_id="r9"))),
        "feedback for 'r9' carries no label or value",
    ),
    Case(
        "an infinite value is refused",
        lambda: validate_feedback(
            feedback("mlp", mesh_pb2.FeedbackItem(request_id="r2", value=math.inf))
        ),
        "feedback for 'r2': value is not finite",
    ),
]


@pytest.mark.parametrize("case", FEEDBACK, ids=_ids(FEEDBACK))
def test_validate_feedback(case: Case) -> None:
    _run(case)


OTHERS = [
    Case("a valid alias name passes", lambda: check_name("alias name", "live"), None),
    Case(
        "a bad name is refused as what it is, with the rule",
        lambda: check_name("alias name", "a b"),
        "invalid alias name 'a b': 1-128 of [A-Za-z0-9_.-]",
    ),
    Case(
        "a bad model name alone gets the short message",
        lambda: check_model_name("../etc"),
        "invalid model name '../etc'",
    ),
    Case("a zero SLO query is accepted", lambda: validate_switching(0.0, 0.0), None),
    Case(
        "a negative SLO query is refused",
        lambda: validate_switching(-1.0, 0.0),
        "slo_ms must be a finite number >= 0, got -1.0",
    ),
    Case(
        "a NaN minimum accuracy is refused",
        lambda: validate_switching(10.0, math.nan),
        "min_accuracy must be a finite number >= 0, got nan",
    ),
    Case(
        "an alias change of valid names passes", lambda: validate_alias_change("mlp", "live"), None
    ),
    Case(
        "an alias change of a bad alias is refused",
        lambda: validate_alias_change("mlp", "li/ve"),
        "invalid alias name 'li/ve'",
    ),
    Case(
        "an alias change of a bad model is refused first",
        lambda: validate_alias_change("", "li/ve"),
        "invalid model name ''",
    ),
    Case("a rollout of a version passes", lambda: validate_rollout("mlp", "live", "v2"), None),
    Case(
        "a rollout without a version is refused before its names are checked",
        lambda: validate_rollout("", "live", ""),
        "rollout needs the version to roll out (a registered version)",
    ),
    Case(
        "a rollout with a bad model name is refused",
        lambda: validate_rollout("a b", "live", "v2"),
        "invalid model name 'a b'",
    ),
    Case("a minimal policy parses", lambda: validate_policy("name: p\n"), None),
    Case(
        "a policy that does not parse is refused with the parser's words",
        lambda: validate_policy("name: [unclosed\n"),
        "invalid policy: ",
    ),
]


@pytest.mark.parametrize("case", OTHERS, ids=_ids(OTHERS))
def test_names_queries_rollouts_and_policies(case: Case) -> None:
    _run(case)


def test_validate_policy_returns_the_parsed_policy() -> None:
    assert validate_policy("name: edge-first\n").name == "edge-first"
