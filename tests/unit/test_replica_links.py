"""Replicas that come and go (issue 14 §2) and the keepalive options (§8), unit level.

Pure functions with hand-built inputs: the node's link plan (:func:`plan_links`), the no-copy
message of a router that cannot reach a READY copy (:func:`no_copy`), the replica-set push of the
hub (its sessions' queues, no stream), and the options that keep the gateway's pings to nodes'
direct ports inside what the node's server accepts.
"""

from __future__ import annotations

import asyncio
import dataclasses
from types import MappingProxyType

import pytest

from meshserve.common.errors import Unavailable
from meshserve.common.routing.resolve import no_copy
from meshserve.controlplane.link.handshake import replica_set
from meshserve.controlplane.link.hub import Hub
from meshserve.controlplane.link.options import (
    MIN_PING_FROM_NODES_MS,
    NODE_PING_FLOOR_MS,
    node_channel_options,
    server_options,
)
from meshserve.controlplane.link.session import NodeSession
from meshserve.controlplane.snapshot import Snapshot
from meshserve.node.agent import LinkView, plan_links
from meshserve.node.link import (
    DIRECT_MIN_PING_MS,
    MIN_KEEPALIVE_MS,
    channel_options,
    direct_server_options,
)
from meshserve.protos import mesh_pb2
from tests.support.fake_registry import FakeRegistry
from tests.support.views import node


def info(replica_id: str) -> mesh_pb2.ReplicaInfo:
    return mesh_pb2.ReplicaInfo(replica_id=replica_id, address=f"{replica_id}:8001")


def up(replica_id: str) -> LinkView:
    return LinkView(replica_id, connected=True)


DOWN = LinkView("", connected=False)

# (case, links by address, seeds, replica list, addresses to dial, addresses to drop)
PLAN_CASES: list[tuple[str, dict[str, LinkView], list[str], list[str], list[str], list[str]]] = [
    (
        "a replica started after the node is dialled",
        {"cp-1:8001": up("cp-1")},
        ["cp-1:8001"],
        ["cp-1", "cp-2"],
        ["cp-2:8001"],
        [],
    ),
    (
        "a replica already reached through a seed alias is not dialled twice",
        {"lb:8001": up("cp-1")},
        ["lb:8001"],
        ["cp-1"],
        [],
        [],
    ),
    (
        "a link being dialled is not dialled again",
        {"cp-1:8001": up("cp-1"), "cp-2:8001": DOWN},
        ["cp-1:8001"],
        ["cp-1", "cp-2"],
        [],
        [],
    ),
    (
        "a gone replica whose stream is down is dropped",
        {"cp-1:8001": up("cp-1"), "cp-2:8001": LinkView("cp-2", connected=False)},
        ["cp-1:8001"],
        ["cp-1"],
        [],
        ["cp-2:8001"],
    ),
    (
        "a gone replica still streaming is kept until its stream ends",
        {"cp-1:8001": up("cp-1"), "cp-2:8001": up("cp-2")},
        ["cp-1:8001"],
        ["cp-1"],
        [],
        [],
    ),
    (
        "a seed is never dropped (a replica restarting there is dialled again)",
        {"cp-1:8001": DOWN, "cp-2:8001": up("cp-2")},
        ["cp-1:8001"],
        ["cp-2"],
        [],
        [],
    ),
]


@pytest.mark.parametrize(
    ("links", "seeds", "replicas", "dial", "drop"),
    [c[1:] for c in PLAN_CASES],
    ids=[c[0] for c in PLAN_CASES],
)
def test_plan_links(
    links: dict[str, LinkView],
    seeds: list[str],
    replicas: list[str],
    dial: list[str],
    drop: list[str],
) -> None:
    assert plan_links(links, seeds, [info(r) for r in replicas]) == (dial, drop)


def _snapshot(direct: bool) -> tuple[Snapshot, mesh_pb2.ModelSpec]:
    spec = mesh_pb2.ModelSpec(name="m", variant="a")
    view = node("edge-1", copies={("m", "a"): mesh_pb2.READY})
    if direct:
        view = dataclasses.replace(view, direct_address="edge-1:9001")
    placement = mesh_pb2.Placement(model="m", variant="a", nodes=["edge-1"])
    snapshot = Snapshot(
        models=MappingProxyType({("m", "a"): spec}),
        placements=MappingProxyType({("m", "a"): placement}),
        nodes=MappingProxyType({"edge-1": view}),
    )
    return snapshot, spec


def test_no_copy_says_a_ready_copy_is_not_reachable_from_this_replica_not_not_ready() -> None:
    snapshot, spec = _snapshot(direct=False)
    error = no_copy(snapshot, spec, linked=frozenset())
    assert isinstance(error, Unavailable)
    assert "is ready on edge-1, not reachable from this replica" in error.message
    assert "retry through another replica" in error.message
    assert "not ready yet" not in error.message


@pytest.mark.parametrize(
    ("direct", "linked"),
    [(True, frozenset()), (False, frozenset({"edge-1"})), (False, None)],
    ids=["the copy has a direct address", "the node is linked here", "no links given"],
)
def test_no_copy_keeps_the_placements_story_when_reachability_is_not_the_cause(
    direct: bool, linked: frozenset[str] | None
) -> None:
    snapshot, spec = _snapshot(direct=direct)
    error = no_copy(snapshot, spec, linked)
    assert "not reachable" not in error.message
    assert "placed on edge-1" in error.message


def _session(node_id: str, outbox_size: int = 8) -> NodeSession:
    return NodeSession(mesh_pb2.Hello(node_id=node_id), "cp-1", outbox_size)


def _told(session: NodeSession) -> list[list[str]]:
    out = []
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message.HasField("replicas"):
            out.append([r.replica_id for r in message.replicas.replicas])
    return out


def test_hub_pushes_each_change_of_the_replica_set_once_to_every_node() -> None:
    async def run() -> None:
        replicas = [info("cp-1")]
        hub = Hub(
            registry=FakeRegistry(),
            replica_id="cp-1",
            lease_ttl_s=5,
            lease_id=lambda: 1,
            snapshot=lambda: Snapshot(),
            replicas=lambda: list(replicas),
        )
        a, b, full = _session("a"), _session("b"), _session("full", outbox_size=1)
        for s in (a, b, full):
            s.replicas_said = replica_set(replicas)  # what their Welcome said
            hub.sessions[s.node_id] = s
        full.outbox.put_nowait(mesh_pb2.ControlMessage())  # a backed-up stream

        assert hub.push_replicas() == 0  # nothing changed
        replicas.append(info("cp-2"))
        assert hub.push_replicas() == 2
        assert _told(a) == _told(b) == [["cp-1", "cp-2"]]
        assert hub.push_replicas() == 0  # told once
        full.outbox.get_nowait()  # the stream drained: the next push reaches it
        assert hub.push_replicas() == 1
        assert _told(full) == [["cp-1", "cp-2"]]
        replicas.clear()  # a view not loaded: never tell nodes there are no replicas
        assert hub.push_replicas() == 0
        replicas.append(info("cp-2"))  # cp-1 left
        assert hub.push_replicas() == 3
        assert _told(a) == [["cp-2"]]

    asyncio.run(run())


def test_the_gateways_pings_to_a_direct_port_stay_inside_the_nodes_ping_policy() -> None:
    node_server = dict(direct_server_options(1 << 20))
    assert node_server["grpc.keepalive_permit_without_calls"] == 1
    assert node_server["grpc.http2.min_ping_interval_without_data_ms"] == DIRECT_MIN_PING_MS
    assert NODE_PING_FLOOR_MS >= 2 * DIRECT_MIN_PING_MS  # timer jitter is never a strike
    for keepalive_ms in (500, 1000, 10_000):
        channel = dict(node_channel_options(1 << 20, keepalive_ms))
        assert channel["grpc.keepalive_time_ms"] >= NODE_PING_FLOOR_MS
        assert channel["grpc.keepalive_time_ms"] >= keepalive_ms
    # The replica's own server accepts the nodes' pings, however low --keepalive-ms is set.
    replica = dict(server_options(1 << 20))
    assert replica["grpc.keepalive_permit_without_calls"] == 1
    assert replica["grpc.http2.min_ping_interval_without_data_ms"] == MIN_PING_FROM_NODES_MS
    for keepalive_ms in (1, 500, 10_000):
        pings_ms = dict(channel_options(1 << 20, keepalive_ms))["grpc.keepalive_time_ms"]
        assert pings_ms >= MIN_KEEPALIVE_MS >= 2 * MIN_PING_FROM_NODES_MS


def test_a_telemetry_handler_that_fails_does_not_end_the_nodes_stream() -> None:
    def broken(node_id: str, telemetry: mesh_pb2.Telemetry) -> None:
        raise OverflowError("Python int too large to convert to C long")  # seen under fuzzing

    async def run() -> None:
        hub = Hub(
            registry=FakeRegistry(),
            replica_id="cp-1",
            lease_ttl_s=5,
            lease_id=lambda: 1,
            snapshot=lambda: Snapshot(),
            replicas=lambda: [info("cp-1")],
            on_telemetry=broken,
        )
        session = _session("a")
        telemetry = mesh_pb2.Telemetry(unix_ms=1)
        hub._on_message(session, mesh_pb2.NodeMessage(telemetry=telemetry))
        assert session.telemetry.unix_ms == 1  # kept for routing; the stream loop goes on

    asyncio.run(run())
