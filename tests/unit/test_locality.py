"""Location-aware narrowing of candidate copies (meshserve.common.routing.locality), and
the zone's trip
from the SDK keyword to the gateway's reading of the request parameter."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from meshserve.client._sdk import _with_routing
from meshserve.common.errors import InvalidArgument
from meshserve.common.params import CLIENT_ZONE
from meshserve.common.routing.locality import prefer_local
from meshserve.controlplane.dataplane.gateway import _zone_of
from meshserve.controlplane.snapshot import NodeView
from meshserve.protos import inference_pb2, mesh_pb2


def _node(node_id: str, **labels: str) -> NodeView:
    return NodeView(
        node_id=node_id,
        labels=MappingProxyType(dict(labels)),
        hardware=mesh_pb2.Hardware(),
        direct_address="",
        replicas=frozenset(),
        copies=MappingProxyType({}),
    )


A1, A2 = _node("a1", zone="a", tier="edge"), _node("a2", zone="a")
B1, NOLABEL = _node("b1", zone="b"), _node("n1", tier="core")
ALL = [A1, B1, NOLABEL, A2]


def _ids(nodes: list[NodeView]) -> list[str]:
    return [n.node_id for n in nodes]


def test_same_zone_candidates_only_and_in_order() -> None:
    assert _ids(prefer_local(ALL, "a")) == ["a1", "a2"]
    assert _ids(prefer_local(ALL, "b")) == ["b1"]


def test_no_zone_keeps_every_candidate() -> None:
    assert _ids(prefer_local(ALL, "")) == _ids(ALL)


def test_a_zone_nobody_is_in_falls_back_to_every_candidate() -> None:
    assert _ids(prefer_local(ALL, "c")) == _ids(ALL)
    assert _ids(prefer_local([NOLABEL], "a")) == ["n1"]


def test_exhausted_local_copies_fall_back_to_other_zones() -> None:
    tried = {"a1", "a2"}  # what the gateway's retry does: drop tried copies, then narrow
    assert _ids(prefer_local([n for n in ALL if n.node_id not in tried], "a")) == ["b1", "n1"]


def test_empty_in_empty_out_and_the_input_is_untouched() -> None:
    assert prefer_local([], "a") == []
    candidates = list(ALL)
    out = prefer_local(candidates, "")
    out.clear()
    assert candidates == ALL


def test_zone_is_matched_exactly_not_by_tier_or_prefix() -> None:
    assert _ids(prefer_local(ALL, "edge")) == _ids(ALL)
    assert _ids(prefer_local([_node("x", zone="ab"), A1], "a")) == ["a1"]


def _request(**params: str | float) -> inference_pb2.ModelInferRequest:
    request = inference_pb2.ModelInferRequest(model_name="m")
    for name, value in params.items():
        if isinstance(value, str):
            request.parameters[name].string_param = value
        else:
            request.parameters[name].double_param = value
    return request


def test_the_gateway_reads_the_zone_parameter() -> None:
    assert _zone_of(_request()) == ""
    assert _zone_of(_request(**{CLIENT_ZONE: "eu-1"})) == "eu-1"
    assert _zone_of(_request(**{CLIENT_ZONE: "  eu-1 "})) == "eu-1"
    with pytest.raises(InvalidArgument):
        _zone_of(_request(**{CLIENT_ZONE: 3.0}))


def test_the_sdk_sets_the_zone_parameter_only_when_given() -> None:
    base = {"x": 1}
    assert _with_routing(base, None, None, None) is base
    assert _with_routing(None, None, None, "") is None
    assert _with_routing(base, None, None, "a") == {"x": 1, CLIENT_ZONE: "a"}
    assert _with_routing(None, 50, 0.9, "b") == {
        "slo_ms": 50.0,
        "min_accuracy": 0.9,
        CLIENT_ZONE: "b",
    }
    assert base == {"x": 1}
