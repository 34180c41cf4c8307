"""The routing core (meshserve.common.routing.router.Router) as the SDK and the gateway use it,
on hand-built snapshots; and the SDK's routed steps (meshserve.client._routed.Query): when a query
goes straight to a node, to another copy, or to the gateway (pure: a stand-in feed)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Collection, Mapping
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest
from opentelemetry import context as otel_context

from meshserve.client._routed import SILENT_HEARTBEATS, Query, RoutedCore, query_facts
from meshserve.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StatusError,
    Unavailable,
)
from meshserve.common.routing.rollout import canary_draw
from meshserve.common.routing.router import Router
from meshserve.common.routing.view import NodeView, Snapshot
from meshserve.protos import inference_pb2, mesh_pb2
from tests.support.views import alias, node

R = mesh_pb2.READY
NOBODY: frozenset[str] = frozenset()


def spec(
    variant: str, accuracy: float = 0.9, *, version: str = "", slo_ms: float = 0.0
) -> mesh_pb2.ModelSpec:
    return mesh_pb2.ModelSpec(
        name="m", variant=variant, accuracy=accuracy, version=version, slo_ms=slo_ms
    )


def snap(
    specs: Collection[mesh_pb2.ModelSpec],
    copies: Mapping[str, Collection[str]],
    *,
    direct: Collection[str] = (),
    zones: Mapping[str, str] | None = None,
    aliases: Collection[mesh_pb2.Alias] = (),
    profiles: Mapping[str, float] | None = None,
) -> Snapshot:
    """``copies``: node -> its READY variants of model "m"; ``direct``: nodes with an OIP port;
    ``zones``: node -> zone label; ``profiles``: variant -> seconds per query (batch 1, on every
    node, one core)."""
    nodes: dict[str, NodeView] = {}
    for node_id, held in copies.items():
        labels = {"zone": zones[node_id]} if zones and node_id in zones else {}
        view = node(node_id, labels=labels, copies={("m", v): R for v in held})
        if node_id in direct:
            view = dataclasses.replace(view, direct_address=f"127.0.0.1:{8000 + len(nodes)}")
        if profiles:
            view = dataclasses.replace(view, hardware=mesh_pb2.Hardware(cpu_cores=1))
            for v in held:
                if v in profiles:
                    status = view.copies[("m", v)]
                    status.latency_profile.add(batch_size=1, seconds=profiles[v])
        nodes[node_id] = view
    return Snapshot(
        models=MappingProxyType({("m", s.variant): s for s in specs}),
        nodes=MappingProxyType(nodes),
        aliases=MappingProxyType({(a.model, a.alias): a for a in aliases}),
    )


def _ids(canary: bool, percent: float, count: int = 20) -> list[str]:
    """Request ids whose canary draw falls under ``percent`` (``canary``) or not."""
    out = []
    i = 0
    while len(out) < count:
        rid = f"req-{i}"
        if (canary_draw(rid) < percent) == canary:
            out.append(rid)
        i += 1
    return out


# -- Router.decide ---------------------------------------------------------------------------

TWO = [spec("small", 0.8), spec("big", 0.95)]  # two variants of the implicit version
VTWO = [spec("small", 0.8, version="small"), spec("big", 0.95, version="big")]  # two versions


# (case, snapshot, name, request ids, slo_s, expected variant, reason contains, alias)
DECIDE_CASES: list[tuple[str, Snapshot, str, list[str], float | None, str, str, str]] = [
    (
        "a pinned variant is answered by that variant, not the most accurate",
        snap(TWO, {"n1": ["small", "big"]}, direct={"n1"}),
        "small",
        ["r1"],
        None,
        "small",
        "p2c",
        "",
    ),
    (
        "no name and no alias: the most accurate variant with a candidate",
        snap(TWO, {"n1": ["small", "big"]}, direct={"n1"}),
        "",
        ["r1"],
        None,
        "big",
        "p2c",
        "",
    ),
    (
        "under a canary, a draw above its share stays on the alias's version",
        snap(
            VTWO,
            {"n1": ["small", "big"]},
            direct={"n1"},
            aliases=[alias("small", canary="big", percent=20)],
        ),
        "",
        _ids(False, 20),
        None,
        "small",
        "alias live",
        "live",
    ),
    (
        "under a canary, a draw below its share goes to the canary version",
        snap(
            VTWO,
            {"n1": ["small", "big"]},
            direct={"n1"},
            aliases=[alias("small", canary="big", percent=20)],
        ),
        "",
        _ids(True, 20),
        None,
        "big",
        "canary",
        "live",
    ),
]


@pytest.mark.parametrize(
    ("case", "snapshot", "name", "ids", "slo_s", "variant", "reason", "alias_name"),
    DECIDE_CASES,
    ids=[c[0] for c in DECIDE_CASES],
)
def test_decide(
    case: str,
    snapshot: Snapshot,
    name: str,
    ids: list[str],
    slo_s: float | None,
    variant: str,
    reason: str,
    alias_name: str,
) -> None:
    router = Router()
    for rid in ids:
        decision = router.decide(snapshot, "m", name, rid, slo_s, None)
        assert decision.spec.variant == variant, rid
        assert reason in decision.reason
        assert decision.alias == alias_name


def test_slo_switching_picks_the_faster_variant_when_the_accurate_one_misses_the_budget() -> None:
    # one core; "accurate" runs in 8 ms, "fast" in 1 ms
    specs = [spec("fast", 0.80), spec("accurate", 0.95)]
    s = snap(
        specs,
        {"n1": ["fast", "accurate"]},
        direct={"n1"},
        profiles={"fast": 0.001, "accurate": 0.008},
    )
    roomy = Router().decide(s, "m", "", "r", 0.100, None)
    assert roomy.spec.variant == "accurate" and roomy.slo_s == pytest.approx(0.100)
    assert roomy.switch_reason and math.isfinite(roomy.predicted_s)
    tight = Router().decide(s, "m", "", "r", 0.004, None)
    assert tight.spec.variant == "fast"
    assert tight.reason.startswith("switch: ") and tight.predicted_s < 0.004
    floor = Router().decide(s, "m", "", "r", 0.004, 0.9)  # never below the minimum accuracy
    assert floor.spec.variant == "accurate"


def test_the_versions_default_slo_is_the_decisions_budget() -> None:
    specs = [spec("fast", 0.80, slo_ms=20), spec("accurate", 0.95, slo_ms=20)]
    s = snap(
        specs,
        {"n1": ["fast", "accurate"]},
        direct={"n1"},
        profiles={"fast": 0.001, "accurate": 0.008},
    )
    decision = Router().decide(s, "m", "", "r", None, None)
    assert decision.slo_s == pytest.approx(0.020)


def test_decide_raises_the_resolutions_domain_errors() -> None:
    s = snap(TWO, {"n1": ["small"]}, direct={"n1"})
    with pytest.raises(NotFound):
        Router().decide(s, "nope", "", "r", None, None)
    with pytest.raises(NotFound):
        Router().decide(s, "m", "v9", "r", None, None)


# -- Router.select ---------------------------------------------------------------------------

ONE = [spec("default")]


def test_zone_preference_the_querys_zone_then_the_routers() -> None:
    s = snap(
        ONE,
        {"n1": ["default"], "n2": ["default"]},
        direct={"n1", "n2"},
        zones={"n1": "east", "n2": "west"},
    )
    router = Router(zone="east")
    for _ in range(20):
        picked, left = router.select(s, s.models[("m", "default")], "west", set())
        assert picked is not None and picked.node_id == "n2" and left == 2
        picked, _ = router.select(s, s.models[("m", "default")], "", set())
        assert picked is not None and picked.node_id == "n1"


def test_tried_copies_are_excluded_and_added() -> None:
    s = snap(ONE, {"n1": ["default"], "n2": ["default"]}, direct={"n1", "n2"})
    router = Router()
    tried = {"n1"}
    picked, left = router.select(s, s.models[("m", "default")], "", tried)
    assert picked is not None and picked.node_id == "n2" and left == 1
    assert tried == {"n1", "n2"}
    assert router.select(s, s.models[("m", "default")], "", tried) == (None, 0)


def test_tunnel_only_copies_are_excluded_when_nothing_is_linked() -> None:
    s = snap(ONE, {"n1": ["default"], "n2": ["default"]}, direct={"n2"})
    the = s.models[("m", "default")]
    sdk = Router(linked=NOBODY)
    assert [n.node_id for n in sdk.candidates(s, the)] == ["n2"]
    picks = Counter(
        picked.node_id
        for picked, _ in (sdk.select(s, the, "", set()) for _ in range(20))
        if picked is not None
    )
    assert picks == Counter({"n2": 20})
    tunnel_only = snap(ONE, {"n1": ["default"]})
    assert Router(linked=NOBODY).select(tunnel_only, the, "", set()) == (None, 0)
    gateway = Router(linked={"n1"})
    assert [n.node_id for n in gateway.candidates(s, the)] == ["n1", "n2"]


def test_begin_and_end_bracket_one_attempt_and_steer_away_from_a_failing_copy() -> None:
    s = snap(ONE, {"n1": ["default"], "n2": ["default"]}, direct={"n1", "n2"})
    the = s.models[("m", "default")]
    router = Router()
    n1 = s.nodes["n1"]
    attempt = router.begin(n1, the)
    assert router.balancer.in_flight(("n1", "m", "default")) == 1
    assert router.end(attempt, ok=False) >= 0
    assert router.balancer.in_flight(("n1", "m", "default")) == 0
    for _ in range(3):  # n2 answers well
        router.end(router.begin(s.nodes["n2"], the), ok=True)
    picks = Counter(
        p.node_id for p, _ in (router.select(s, the, "", set()) for _ in range(20)) if p
    )
    assert picks["n2"] == 20


# -- the SDK's steps (Query) -----------------------------------------------------------------


class _Feed:
    """Stands in for a FeedClient: what RoutedCore reads of it."""

    def __init__(self, view: Snapshot, *, ready: bool = True, age_s: float = 0.0) -> None:
        self.view = view
        self.ready = ready
        self.age = age_s
        self.state = SimpleNamespace(heartbeat_s=1.0, has_view=ready, load=lambda n, k: None)

    def age_s(self) -> float:
        return self.age

    def snapshot(self) -> Snapshot:
        return self.view


def _core(view: Snapshot, **feed: Any) -> RoutedCore:
    core = RoutedCore()
    core.feed = _Feed(view, **feed)  # type: ignore[assignment]
    core.publish()
    return core


def _query(core: RoutedCore, version: str = "", **params: Any) -> Query:
    request = inference_pb2.ModelInferRequest(model_name="m", model_version=version, id="q1")
    for key, value in params.items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].double_param = value
    now = time.monotonic()
    return Query(core, request, now + 5.0, now, otel_context.get_current())


BOTH_DIRECT = snap(ONE, {"n1": ["default"], "n2": ["default"]}, direct={"n1", "n2"})


def test_a_fresh_feed_sends_the_query_straight_to_a_direct_copy() -> None:
    query = _query(_core(BOTH_DIRECT))
    step = query.first()
    assert step.node is not None and step.node.node_id in ("n1", "n2")
    assert step.variant == "default" and step.timeout > 0
    sent = inference_pb2.ModelInferRequest.FromString(query.unary_payload(step))
    assert (sent.model_name, sent.model_version) == ("m", "default")
    response = query.answered(step, inference_pb2.ModelInferResponse())
    assert "meshserve_slo_met" not in response.parameters  # no SLO
    assert query.core.router.balancer.in_flight((step.node.node_id, "m", "default")) == 0


# (case, core, version, expected fallback reason contains)
GATEWAY_CASES: list[tuple[str, RoutedCore, str, str]] = [
    ("the feed has no view yet", _core(BOTH_DIRECT, ready=False), "", "not ready"),
    (
        "the feed is silent for 3 heartbeats",
        _core(BOTH_DIRECT, age_s=SILENT_HEARTBEATS + 0.1),
        "",
        "silent",
    ),
    ("only tunnel-only copies", _core(snap(ONE, {"n1": ["default"]})), "", "no direct copy"),
    ("scaled to zero: no copy at all", _core(snap(ONE, {})), "", "no direct copy"),
    ("a model the feed does not know (yet)", _core(snap(ONE, {})), "v7", "not_found"),
]


@pytest.mark.parametrize(
    ("case", "core", "version", "why"), GATEWAY_CASES, ids=[c[0] for c in GATEWAY_CASES]
)
def test_the_gateway_answers(case: str, core: RoutedCore, version: str, why: str) -> None:
    step = _query(core, version).first()
    assert step.node is None and why in step.fallback
    assert step.timeout > 4.0  # the attempt's whole deadline


def test_a_tunnel_only_copy_does_not_change_the_variant_the_gateway_would_pick() -> None:
    # the most accurate variant is only on a tunnel-only node: the SDK must not downgrade
    s = snap(TWO, {"edge": ["big"], "core": ["small"]}, direct={"core"})
    step = _query(_core(s)).first()
    assert step.node is None  # the gateway reaches "big" through the edge node's stream


def test_retry_on_the_other_copy_then_the_gateway() -> None:
    query = _query(_core(BOTH_DIRECT))
    first = query.first()
    assert first.node is not None
    assert first.limited  # another copy exists: a stalled first attempt is cut short
    second = query.failed(first, Unavailable("gone"))
    assert second.node is not None and second.node.node_id != first.node.node_id
    third = query.failed(second, ResourceExhausted("full", retry_after_s=0.05))
    assert third.node is None and "every direct copy failed" in third.fallback
    with pytest.raises(Unavailable):
        query.failed(third, Unavailable("gateway down"))  # the retry policy's turn
    balancer = query.core.router.balancer
    assert all(balancer.in_flight((n, "m", "default")) == 0 for n in ("n1", "n2"))


@pytest.mark.parametrize(
    "error",
    [InvalidArgument("bad input"), PermissionDenied("not yours")],
    ids=lambda e: e.code.name,
)
def test_a_callers_error_from_a_node_is_the_answer(error: StatusError) -> None:
    query = _query(_core(BOTH_DIRECT))
    step = query.first()
    with pytest.raises(type(error)):
        query.failed(step, error)


def test_a_node_that_lost_the_copy_sends_the_query_elsewhere() -> None:
    query = _query(_core(BOTH_DIRECT))
    step = query.failed(query.first(), NotFound("model 'm' is not served by this node"))
    assert step.node is not None


def test_an_slo_answer_is_marked_from_the_measured_time() -> None:
    query = _query(_core(BOTH_DIRECT), slo_ms=10_000.0)
    step = query.first()
    response = query.answered(step, inference_pb2.ModelInferResponse())
    assert response.parameters["meshserve_slo_met"].bool_param is True
    late = _query(_core(BOTH_DIRECT), slo_ms=1.0)
    late.started -= 1.0
    step = late.first()
    assert (
        late.answered(step, inference_pb2.ModelInferResponse())
        .parameters["meshserve_slo_met"]
        .bool_param
        is False
    )


def test_the_prefer_list_and_variant_are_appended_to_the_unary_request() -> None:
    query = _query(_core(BOTH_DIRECT), "", zone="x")
    step = query.first()
    step.variant, step.prefer = "fast", "big,bigger"
    sent = inference_pb2.ModelInferRequest.FromString(query.unary_payload(step))
    assert sent.model_version == "fast"
    assert sent.parameters["meshserve_prefer"].string_param == "big,bigger"
    assert sent.parameters["zone"].string_param == "x"  # the caller's own parameters stay


@pytest.mark.parametrize(
    ("params", "expected"),
    [({}, (None, None)), ({"slo_ms": 20.0, "min_accuracy": 0.9}, (0.020, 0.9))],
)
def test_query_facts(params: dict[str, float], expected: tuple[Any, Any]) -> None:
    request = inference_pb2.ModelInferRequest(model_name="m")
    for key, value in params.items():
        request.parameters[key].double_param = value
    assert query_facts(request) == expected


def test_unparsable_routing_parameters_go_to_the_gateway_which_says_why() -> None:
    step = _query(_core(BOTH_DIRECT), slo_ms="soon").first()
    assert step.node is None and "routing parameters" in step.fallback
    request = inference_pb2.ModelInferRequest(model_name="m")
    request.parameters["slo_ms"].double_param = -1.0
    with pytest.raises(InvalidArgument):
        query_facts(request)


def _query_id(core: RoutedCore, rid: str) -> Query:
    query = _query(core)
    query.request.id = rid
    return query


def test_a_decision_that_depends_on_the_view_only_is_held_for_that_view() -> None:
    s = snap(VTWO, {"n1": ["small", "big"]}, direct={"n1"}, aliases=[alias("small")])
    core = _core(s)
    first = _query(core)
    first.first()
    held = core.decided(s, ("m", ""))
    assert held is not None and held[0].spec.variant == "small"
    again = _query(core)
    again.first()
    assert again.decision is held[0]  # not decided again
    other = dataclasses.replace(s)  # a new view: decided again
    assert core.decided(other, ("m", "")) is None


def test_a_canary_or_an_slo_is_decided_per_query() -> None:
    canary = snap(
        VTWO,
        {"n1": ["small", "big"]},
        direct={"n1"},
        aliases=[alias("small", canary="big", percent=20)],
    )
    core = _core(canary)
    seen = Counter()
    for rid in _ids(True, 20, 5) + _ids(False, 20, 5):
        query = _query_id(core, rid)
        query.first()
        assert query.decision is not None
        seen[query.decision.spec.variant] += 1
    assert seen == Counter({"big": 5, "small": 5})
    assert core.decided(canary, ("m", "")) is None
    timed = _core(BOTH_DIRECT)
    _query(timed, slo_ms=50.0).first()
    assert timed.decided(BOTH_DIRECT, ("m", "")) is None
