"""Aliases and rollouts (meshserve.common.routing.rollout): which version answers, and how
records change."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.common.routing.rollout import (
    DEFAULT_ALIAS,
    IMPLICIT_VERSION,
    VersionState,
    alias_for,
    alias_status,
    canary_draw,
    check_registration,
    first_live,
    plan_rollback,
    plan_rollout,
    resolve,
    version_of,
)
from meshserve.protos import mesh_pb2
from tests.support import views


def alias(version: str = "v2", **kw: Any) -> mesh_pb2.Alias:
    """Model ``m``'s ``live`` alias, at ``v2`` unless told (see tests/support/views.alias)."""
    return views.alias(version, **kw)


def st(ready: int, wanted: int = 2) -> VersionState:
    return VersionState(ready=ready, wanted=wanted)


# (case, alias, states, draw, expected version)
RESOLVE_CASES = [
    ("a warm target serves", alias(previous="v1"), {"v1": st(2), "v2": st(2)}, 50, "v2"),
    (
        "a target still loading leaves the traffic on the previous version",
        alias(previous="v1"),
        {"v1": st(2), "v2": st(0)},
        50,
        "v1",
    ),
    (
        "a target with fewer ready copies than the previous version is still warming",
        alias(previous="v1"),
        {"v1": st(2), "v2": st(1)},
        50,
        "v1",
    ),
    (
        "a target as ready as the previous version takes over (it cannot get more copies)",
        alias(previous="v1"),
        {"v1": st(1), "v2": st(1, wanted=3)},
        50,
        "v2",
    ),
    (
        "a target with every wanted copy ready serves even when the previous has more",
        alias(previous="v1"),
        {"v1": st(3, wanted=3), "v2": st(1, wanted=1)},
        50,
        "v2",
    ),
    (
        "a previous version no longer registered is never a fallback",
        alias(previous="v1"),
        {"v2": st(0)},
        50,
        "v2",
    ),
    (
        "a previous version with no ready copy is never a fallback",
        alias(previous="v1"),
        {"v1": st(0), "v2": st(0)},
        50,
        "v2",
    ),
    ("no previous version: the target, ready or not", alias(), {"v2": st(0)}, 50, "v2"),
    (
        "a draw under the canary percent goes to a warm canary",
        alias(version="v1", canary="v2", percent=10),
        {"v1": st(2), "v2": st(2)},
        9.99,
        "v2",
    ),
    (
        "a draw at or over the canary percent stays on the serving version",
        alias(version="v1", canary="v2", percent=10),
        {"v1": st(2), "v2": st(2)},
        10.0,
        "v1",
    ),
    (
        "a canary short of copies takes nothing",
        alias(version="v1", canary="v2", percent=90),
        {"v1": st(2), "v2": st(1)},
        0.0,
        "v1",
    ),
    (
        "an unregistered canary takes nothing",
        alias(version="v1", canary="v2", percent=90),
        {"v1": st(2)},
        0.0,
        "v1",
    ),
    (
        "a canary of the version warming behind: the stable share stays on the previous one",
        alias(version="v2", previous="v1", canary="v3", percent=50),
        {"v1": st(2), "v2": st(0), "v3": st(2)},
        60.0,
        "v1",
    ),
]


@pytest.mark.parametrize(
    ("a", "states", "draw", "expected"),
    [c[1:] for c in RESOLVE_CASES],
    ids=[c[0] for c in RESOLVE_CASES],
)
def test_resolve(
    a: mesh_pb2.Alias, states: dict[str, VersionState], draw: float, expected: str
) -> None:
    assert resolve(a, states, draw).version == expected


def test_the_route_says_why_and_whether_the_canary_is_active() -> None:
    warming = resolve(alias(previous="v1"), {"v1": st(2), "v2": st(1)}, 0.0)
    assert (warming.serving, warming.canary, warming.canary_active) == ("v1", False, False)
    assert "warming (1/2 copies ready): v1 serves" in warming.reason
    states = {"v1": st(1, wanted=1), "v2": st(1, wanted=1)}
    canary = resolve(alias(version="v1", canary="v2", percent=25), states, 3)
    assert (canary.version, canary.serving, canary.canary, canary.canary_active) == (
        "v2",
        "v1",
        True,
        True,
    )
    assert canary.alias == DEFAULT_ALIAS


def test_alias_status_reports_the_serving_version_and_readiness() -> None:
    status = alias_status(
        alias(version="v2", previous="v1", canary="v3", percent=5),
        {"v1": st(2), "v2": st(0), "v3": st(1, wanted=1)},
    )
    assert status.serving == "v1" and status.canary_active
    assert [(v.version, v.ready, v.wanted) for v in status.versions] == [
        ("v1", 2, 2),
        ("v2", 0, 2),
        ("v3", 1, 1),
    ]


def test_queries_follow_live_when_they_name_nothing_and_an_alias_by_its_name() -> None:
    live, stable = alias(), alias(version="v1", name="stable")
    aliases = {("m", "live"): live, ("m", "stable"): stable}
    assert alias_for(aliases, "m", "") is live
    assert alias_for(aliases, "m", "stable") is stable
    assert alias_for(aliases, "m", "v1") is None, "a version (or variant) name is no alias"
    assert alias_for(aliases, "m", "nope") is None
    assert alias_for({}, "m", "") is None, "no live alias: the model's only version decides"
    assert alias_for(aliases, "other", "") is None


def test_alias_status_lists_each_versions_variants() -> None:
    status = alias_status(
        alias(version="v2", previous="v1"),
        {"v1": st(2), "v2": st(2)},
        {"v1": ["v1"], "v2": ["v2-int8", "v2"]},
    )
    assert [(v.version, list(v.variants)) for v in status.versions] == [
        ("v1", ["v1"]),
        ("v2", ["v2", "v2-int8"]),
    ]


def test_canary_draw_is_stable_per_request_id_and_splits_evenly() -> None:
    assert canary_draw("req-1") == canary_draw("req-1")
    draws = [canary_draw(f"req-{i}") for i in range(4000)]
    assert all(0 <= d < 100 for d in draws)
    assert 0.45 < sum(d < 50 for d in draws) / len(draws) < 0.55
    rng = random.Random(1)
    random_draws = [canary_draw("", rng) for _ in range(4000)]
    assert 0.07 < sum(d < 10 for d in random_draws) / len(random_draws) < 0.13


def test_a_canary_split_over_many_queries_matches_the_percentage() -> None:
    a = alias(version="v1", canary="v2", percent=30)
    states = {"v1": st(2), "v2": st(2)}
    mix = Counter(resolve(a, states, canary_draw(f"q{i}")).version for i in range(3000))
    assert 0.26 < mix["v2"] / 3000 < 0.34


def _rollout(
    current: mesh_pb2.Alias | None,
    version: str,
    percent: float = 0.0,
    serving: str = "",
    registered: tuple[str, ...] = ("v1", "v2", "v3"),
    name: str = DEFAULT_ALIAS,
    variants: tuple[str, ...] = ("v1", "v2", "v2-int8", "v3"),
) -> mesh_pb2.Alias:
    return plan_rollout(
        current,
        model="m",
        alias=name,
        version=version,
        canary_percent=percent,
        registered=registered,
        serving_now=serving,
        now_ms=1234,
        variants=variants,
    )


def test_a_first_rollout_keeps_what_serves_now_as_the_previous_version() -> None:
    out = _rollout(None, "v2", serving="v1")
    assert (out.model, out.alias, out.version, out.previous_version) == ("m", "live", "v2", "v1")
    assert out.updated_unix_ms == 1234
    assert _rollout(None, "v2").previous_version == "", "nothing served: nothing to warm behind"


def test_a_rollout_moves_from_the_serving_version_and_clears_the_canary() -> None:
    current = alias(version="v1", canary="v2", percent=50)
    out = _rollout(current, "v2", serving="v1")  # promote the canary
    assert (out.version, out.previous_version, out.canary_version) == ("v2", "v1", "")
    # 100 is a whole rollout like 0
    assert _rollout(current, "v2", 100, serving="v1").version == "v2"
    # while v2 still warms (v1 serving), rolling on to v3 keeps v1 behind it
    warming = alias(version="v2", previous="v1")
    assert _rollout(warming, "v3", serving="v1").previous_version == "v1"


def test_a_rollout_to_the_current_version_changes_nothing() -> None:
    current = alias(version="v2", previous="v1")
    assert _rollout(current, "v2", serving="v2") is current


def test_a_canary_keeps_the_alias_version_and_previous() -> None:
    current = alias(version="v1", previous="v0")
    out = _rollout(current, "v2", 10, serving="v1")
    assert (out.version, out.previous_version, out.canary_version, out.canary_percent) == (
        "v1",
        "v0",
        "v2",
        10,
    )
    assert _rollout(out, "v2", 10) is out, "the same canary again changes nothing"
    assert _rollout(out, "v2", 20).canary_percent == 20


V1 = alias(version="v1")

# (case, current alias, version, canary percent, alias name, error, part of the message)
REFUSED = [
    ("percent over 100", V1, "v2", 101, "live", InvalidArgument, "between 0 and 100"),
    ("negative percent", V1, "v2", -1, "live", InvalidArgument, "between 0 and 100"),
    ("NaN percent", V1, "v2", float("nan"), "live", InvalidArgument, "between 0 and 100"),
    ("unregistered version", V1, "v9", 0, "live", NotFound, "models register m --version v9"),
    ("a variant is no version", V1, "v2-int8", 0, "live", NotFound, "is a variant: roll out"),
    ("alias named like a version", None, "v2", 0, "v1", InvalidArgument, "also a version"),
    ("alias named like a variant", None, "v2", 0, "v2-int8", InvalidArgument, "also a variant"),
    ("canary without an alias", None, "v2", 10, "live", FailedPrecondition, "roll a version"),
    ("canary of its own version", V1, "v1", 10, "live", FailedPrecondition, "already points"),
]


@pytest.mark.parametrize(
    ("current", "version", "percent", "name", "error", "message"),
    [c[1:] for c in REFUSED],
    ids=[c[0] for c in REFUSED],
)
def test_rollout_refuses(
    current: mesh_pb2.Alias | None,
    version: str,
    percent: float,
    name: str,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        _rollout(current, version, percent, registered=("v1", "v2"), name=name)


def test_a_canary_on_a_model_without_an_alias_yet_canaries_against_what_serves() -> None:
    out = _rollout(None, "v2", 20, serving="v1")
    assert (out.alias, out.version, out.canary_version, out.canary_percent) == (
        "live",
        "v1",
        "v2",
        20,
    )


def spec(variant: str, version: str = "") -> mesh_pb2.ModelSpec:
    return mesh_pb2.ModelSpec(name="m", variant=variant, version=version)


def test_a_variant_without_a_version_belongs_to_the_implicit_version() -> None:
    assert version_of(spec("fast")) == IMPLICIT_VERSION == "default"
    assert version_of(spec("v2-int8", "v2")) == "v2"


def test_the_first_version_registered_becomes_live() -> None:
    first = first_live(spec("v1", "v1"), [], 7)
    assert (first.model, first.alias, first.version, first.updated_unix_ms) == (
        "m",
        "live",
        "v1",
        7,
    )
    # a model registered before aliases existed: its (implicit) version goes live, not the new one
    assert first_live(spec("v2", "v2"), [spec("default")], 7).version == "default"


EXISTING = [spec("v1", "v1"), spec("v1-int8", "v1")]

# (case, spec registered beside EXISTING, part of the message; None: accepted)
REGISTRATIONS = [
    ("a new version", spec("v2", "v2"), None),
    ("another variant of a version", spec("v1-fp16", "v1"), None),
    ("re-registering a variant in its version", spec("v1-int8", "v1"), None),
    ("a variant name taken by another version", spec("v1-int8", "v2"), "belongs to version 'v1'"),
    ("a variant named like another version", spec("v1", "v2"), "belongs to version 'v1'"),
    ("a variant named like another version (no clash)", spec("v3", "v2"), None),
    ("a version named like another version's variant", spec("x", "v1-int8"), "is a variant"),
]


@pytest.mark.parametrize(
    ("registered", "message"), [c[1:] for c in REGISTRATIONS], ids=[c[0] for c in REGISTRATIONS]
)
def test_registration_keeps_version_and_variant_names_unambiguous(
    registered: mesh_pb2.ModelSpec, message: str | None
) -> None:
    others = [s for s in EXISTING if s.variant != registered.variant]
    if message is None:
        check_registration(registered, others)
        return
    with pytest.raises(InvalidArgument, match=message):
        check_registration(registered, EXISTING)


def test_a_variant_may_not_carry_the_name_of_another_version() -> None:
    with pytest.raises(InvalidArgument, match="is a version of model"):
        check_registration(spec("v1", "v2"), [spec("v1-int8", "v1")])


def _rollback(current: mesh_pb2.Alias | None, registered: tuple[str, ...] = ("v1", "v2")) -> Any:
    return plan_rollback(current, model="m", alias="live", registered=registered, now_ms=99)


def test_rollback_drops_a_canary_first() -> None:
    out = _rollback(alias(version="v1", previous="v0", canary="v2", percent=50))
    assert (out.version, out.previous_version, out.canary_version, out.canary_percent) == (
        "v1",
        "v0",
        "",
        0,
    )


def test_rollback_points_the_alias_back_and_forgets_the_bad_version() -> None:
    out = _rollback(alias(version="v2", previous="v1"))
    assert (out.version, out.previous_version, out.updated_unix_ms) == ("v1", "", 99)
    with pytest.raises(FailedPrecondition, match="no canary and no previous version"):
        _rollback(out)


def test_rollback_refuses_a_missing_alias_or_an_unregistered_previous_version() -> None:
    with pytest.raises(NotFound, match="no alias 'live'"):
        _rollback(None)
    with pytest.raises(FailedPrecondition, match="no longer registered"):
        _rollback(alias(version="v2", previous="v1"), registered=("v2",))
