"""Shedding by predicted wait at the gateway (issue 15 §6): Router.predicted_s, the outcome margin
(Admission.margin / settled / shed) and the gateway's choice among copies (Gateway._fit), on
hand-built snapshots."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from types import MappingProxyType

import pytest
from opentelemetry import trace

from meshserve.common.errors import ResourceExhausted
from meshserve.common.routing.router import Router
from meshserve.common.routing.view import NodeView, Snapshot
from meshserve.controlplane.dataplane.admission import HEADROOM, Admission
from meshserve.controlplane.dataplane.gateway import Gateway
from meshserve.protos import mesh_pb2
from tests.support.views import node

SPEC = mesh_pb2.ModelSpec(name="m", variant="default")


def _view(node_id: str, run_s: float | None, cores: int = 1) -> NodeView:
    """A node with a READY copy of m/default whose batch-1 profile is ``run_s`` (None: none)."""
    view = node(node_id, copies={("m", "default"): mesh_pb2.READY})
    view = dataclasses.replace(
        view, hardware=mesh_pb2.Hardware(cpu_cores=cores), direct_address=f"{node_id}:1"
    )
    if run_s is not None:
        view.copies[("m", "default")].latency_profile.add(batch_size=1, seconds=run_s)
    return view


def _snapshot(*views: NodeView) -> Snapshot:
    return Snapshot(
        models=MappingProxyType({("m", "default"): SPEC}),
        nodes=MappingProxyType({v.node_id: v for v in views}),
    )


def _telemetry(
    reports: Mapping[str, mesh_pb2.ModelTelemetry],
) -> Router:
    return Router(telemetry=lambda node_id, key: reports.get(node_id))


def test_the_prediction_counts_this_routers_queries_and_the_nodes_queue_not_a_stale_count() -> None:
    n1 = _view("n1", 0.010)
    stale = mesh_pb2.ModelTelemetry(in_flight=500, queue_depth=3)  # an old in-flight count
    router = _telemetry({"n1": stale})
    key = ("n1", "m", "default")
    for _ in range(4):
        router.balancer.started(key)
    # (4 ours + 3 queued + 1) runs of 10 ms on one core, plus the transport
    assert router.predicted_s(n1, SPEC) == pytest.approx(8 * 0.010 + 0.0015)


def test_no_profile_and_nothing_observed_is_no_prediction() -> None:
    assert math.isinf(Router().predicted_s(_view("n1", None), SPEC))


def test_misses_narrow_the_margin_to_a_floor_and_answers_in_time_widen_it_back() -> None:
    admission = Admission()
    admission.admit("m", 1).release()
    assert admission.margin("m") == 1.0
    admission.settled("m", missed=True)
    assert admission.margin("m") == pytest.approx(0.95)
    for _ in range(100):
        admission.settled("m", missed=True)
    assert admission.margin("m") == pytest.approx(0.3)
    for _ in range(100):
        admission.settled("m", missed=False)
    assert admission.margin("m") == pytest.approx(0.4)
    for _ in range(1000):
        admission.settled("m", missed=False)
    assert admission.margin("m") == 1.0
    assert Admission().margin("unknown") == 1.0


def test_a_shed_query_is_told_how_much_longer_than_its_budget_it_would_wait() -> None:
    admission = Admission()
    error = admission.shed("m", predicted_s=0.9, remaining_s=0.4)
    assert isinstance(error, ResourceExhausted)
    assert error.retry_after_s == pytest.approx(0.9 - HEADROOM * 0.4)
    assert "900 ms" in error.message and "400 ms left" in error.message
    assert admission.shed("m", 0.001, 0.4).retry_after_s == pytest.approx(0.010)
    assert (admission.refused, admission.shed_count) == (2, 2)


def test_shedding_is_off_with_admission_off() -> None:
    assert Admission().shed_late
    assert not Admission(per_copy=0, per_client=0).shed_late
    assert Admission(per_copy=0, per_client=0, shed_late=True).shed_late


def _gateway(snapshot: Snapshot) -> Gateway:
    return Gateway(snapshot=lambda: snapshot, channel_options=[], ready=lambda: True)


async def test_the_gateway_sends_to_a_copy_that_fits_and_sheds_when_none_does() -> None:
    busy, idle = _view("busy", 0.010), _view("idle", 0.010)
    snapshot = _snapshot(busy, idle)
    gateway = _gateway(snapshot)
    route = gateway.router
    for _ in range(50):  # 0.5 s of work ahead on "busy"
        route.balancer.started(("busy", "m", "default"))
    try:
        deadline = time.monotonic() + 0.2
        tried = {"busy"}
        span = trace.INVALID_SPAN
        chosen = gateway._fit(snapshot, SPEC, "", tried, busy, deadline, span)
        assert chosen.node_id == "idle" and tried == {"idle"}, "skipped, not tried"
        for _ in range(50):
            route.balancer.started(("idle", "m", "default"))
        with pytest.raises(ResourceExhausted, match="at the earliest") as caught:
            gateway._fit(snapshot, SPEC, "", {"busy"}, busy, deadline, span)
        assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0.3
        # no prediction (no profile, nothing observed): never shed
        bare = _snapshot(_view("bare", None))
        chosen = _gateway(bare)._fit(
            bare, SPEC, "", set(), bare.nodes["bare"], time.monotonic() + 0.001, span
        )
        assert chosen.node_id == "bare"
    finally:
        await gateway.close()
