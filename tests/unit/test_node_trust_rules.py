"""What the control plane believes of a node (issue 16 §3, §5, §10): the pure rules of
controlplane/link/trust.py, admin-side labels in the snapshot, and the hub's coalesced reconcile."""

from __future__ import annotations

import asyncio

from meshserve.controlplane import keys
from meshserve.controlplane.link import trust
from meshserve.controlplane.link.hub import Hub
from meshserve.controlplane.link.session import NodeSession
from meshserve.controlplane.observe.telemetry import live_in_flight
from meshserve.controlplane.snapshot import (
    Snapshot,
    SnapshotBuilder,
    effective_hardware,
    effective_labels,
)
from meshserve.protos import mesh_pb2
from tests.support.fake_registry import FakeRegistry

SHA = "ab" * 32
KEY = ("m", "default")


def _status(state: int, sha: str = SHA, model: str = "m") -> mesh_pb2.CopyStatus:
    return mesh_pb2.CopyStatus(model=model, variant="default", state=state, sha256=sha)


def _snapshot(placed_on: list[str] | None = None) -> Snapshot:
    spec = mesh_pb2.ModelSpec(name="m", variant="default", artifact_uri="file:///m", sha256=SHA)
    placements = {} if placed_on is None else {KEY: mesh_pb2.Placement(nodes=placed_on)}
    return Snapshot({KEY: spec}, placements, {}, {KEY: 3} if placed_on else {}, 5)


def test_a_report_is_believed_only_as_ordered() -> None:
    ordered = {KEY: [SHA]}
    assert trust.judge(_status(mesh_pb2.READY), ordered, set()) is None
    assert trust.judge(_status(mesh_pb2.LOADING), ordered, set()) is None
    assert trust.judge(_status(mesh_pb2.READY, "f" * 64), ordered, set()) == trust.OTHER_SHA256
    assert trust.judge(_status(mesh_pb2.READY, model="x"), ordered, set()) == trust.NEVER_ORDERED
    assert trust.judge(_status(mesh_pb2.UNLOADED, model="x"), {}, set()) is None, "gone is gone"
    full = {("n", str(i)) for i in range(trust.MAX_COPIES_PER_NODE)}
    assert trust.judge(_status(mesh_pb2.READY), ordered, full) == trust.TOO_MANY


def test_hello_copies_count_only_with_the_registered_sha256() -> None:
    believed, refused = trust.adopted(
        _snapshot(),
        [
            _status(mesh_pb2.READY),
            _status(mesh_pb2.READY, "f" * 64),
            _status(mesh_pb2.READY, model="unregistered"),
            _status(mesh_pb2.UNLOADED),
        ],
    )
    assert [(c.model, c.sha256) for c in believed] == [("m", SHA)]
    assert [(c.model, c.sha256) for c in refused] == [("m", "f" * 64), ("unregistered", SHA)]


def test_telemetry_keeps_only_held_copies() -> None:
    telemetry = mesh_pb2.Telemetry(
        unix_ms=7,
        models=[mesh_pb2.ModelTelemetry(model=f"x{i}", variant="default") for i in range(5)]
        + [mesh_pb2.ModelTelemetry(model="m", variant="default", requests=3)],
    )
    kept, dropped = trust.held_telemetry(telemetry, {KEY})
    assert dropped == 5 and kept.unix_ms == 7
    assert [(t.model, t.requests) for t in kept.models] == [("m", 3)]
    same, none = trust.held_telemetry(kept, {KEY})
    assert same is kept and none == 0


def test_the_telemetry_budget_drops_the_excess_and_refills() -> None:
    now = [0.0]
    budget = trust.ByteBudget(1000, 4000, clock=lambda: now[0])
    assert budget.take(3000) and not budget.take(2000)
    assert (budget.dropped, budget.dropped_bytes) == (1, 2000)
    now[0] = 1.0
    assert budget.take(2000)


def test_claims_are_bounded_and_logged_once_per_reason() -> None:
    claims = trust.Claims()
    firsts = [
        claims.refuse(_status(mesh_pb2.READY, model=f"x{i}"), trust.NEVER_ORDERED)
        for i in range(trust.MAX_CLAIMS + 500)
    ]
    assert firsts.count(True) == 1
    assert len(claims.copies) == trust.MAX_CLAIMS
    assert claims.refused[trust.NEVER_ORDERED] == trust.MAX_CLAIMS + 500
    held = claims.as_unheld({})
    assert all(not c.sha256 for c in held.values()), "a claim is never taken as the artifact"


def test_placement_matches_admin_labels_and_claims_only_when_trusted() -> None:
    claimed = {"tier": "core", "zone": "a"}
    assert effective_labels(claimed, {}, trust=False) == {}
    assert effective_labels(claimed, {"tier": "edge"}, trust=False) == {"tier": "edge"}
    assert effective_labels(claimed, {"tier": "edge"}, trust=True) == {"tier": "edge", "zone": "a"}
    info = mesh_pb2.NodeInfo(node_id="n1", labels=claimed, replicas=["cp-1"])
    links = {keys.node_link_key("n1", "cp-1"): keys.encode(info)}
    builder = SnapshotBuilder()
    assert dict(builder.build({}, {}, links).nodes["n1"].labels) == {}
    admin = {keys.node_labels_key("n1"): keys.encode(mesh_pb2.NodeLabels(labels={"tier": "x"}))}
    view = builder.build({}, {}, links, node_labels=admin).nodes["n1"]
    assert dict(view.labels) == {"tier": "x"}, "an admin change rebuilds the cached view"
    trusted = builder.build({}, {}, links, node_labels=admin, trust_node_labels=True)
    assert dict(trusted.nodes["n1"].labels) == {"tier": "x", "zone": "a"}


def _hub_with_n1() -> tuple[Hub, NodeSession]:
    """A hub (fake registry) holding one stream, node n1's, placed on ``m/default``."""
    hub = Hub(
        registry=FakeRegistry(),
        replica_id="cp-1",
        lease_ttl_s=3,
        lease_id=lambda: 1,
        snapshot=lambda: _snapshot(["n1"]),
        replicas=lambda: [],
    )
    session = NodeSession(mesh_pb2.Hello(node_id="n1"), "cp-1", 4096)
    hub.sessions["n1"] = session
    return hub, session


def test_reports_coalesce_into_one_reconcile_per_node() -> None:
    async def scenario() -> int:
        hub, session = _hub_with_n1()
        runs = 0
        original = hub.reconcile_session

        def counted(s: NodeSession, snap: Snapshot) -> None:
            nonlocal runs
            runs += 1
            original(s, snap)

        hub.reconcile_session = counted  # type: ignore[method-assign]
        for i in range(2000):  # a burst read in one go: never ordered, each refused
            hub._on_message(
                session, mesh_pb2.NodeMessage(copy_status=_status(mesh_pb2.READY, model=f"x{i}"))
            )
        await asyncio.sleep(0)
        assert session.copies == {}
        assert len(session.claims.copies) == trust.MAX_CLAIMS
        return runs

    assert asyncio.run(scenario()) == 1


def test_admin_labels_cap_the_hardware_a_node_claims() -> None:
    huge = mesh_pb2.Hardware(cpu_cores=4096, memory_bytes=4096 << 30)
    assert effective_hardware(huge, {}) is huge, "no cap: as claimed"
    capped = effective_hardware(huge, {"max-memory-mb": "2048", "max-cpu-cores": "8"})
    assert (capped.memory_bytes, capped.cpu_cores) == (2048 << 20, 8)
    small = mesh_pb2.Hardware(cpu_cores=2, memory_bytes=512 << 20)
    lowered = effective_hardware(small, {"max-memory-mb": "2048", "max-cpu-cores": "8"})
    assert (lowered.memory_bytes, lowered.cpu_cores) == (512 << 20, 2), "a claim only lowers it"
    unknown = effective_hardware(mesh_pb2.Hardware(), {"max-memory-mb": "100"})
    assert unknown.memory_bytes == 100 << 20, "unknown (0, no limit) becomes the cap"
    assert effective_hardware(huge, {"max-memory-mb": "lots"}) is huge
    assert effective_hardware(huge, {"max-cpu-cores": "9" * 40}).cpu_cores == 4096
    info = mesh_pb2.NodeInfo(node_id="n1", hardware=huge, replicas=["cp-1"])
    links = {keys.node_link_key("n1", "cp-1"): keys.encode(info)}
    admin = {
        keys.node_labels_key("n1"): keys.encode(mesh_pb2.NodeLabels(labels={"max-memory-mb": "64"}))
    }
    view = SnapshotBuilder().build({}, {}, links, node_labels=admin).nodes["n1"]
    assert view.hardware.memory_bytes == 64 << 20


def test_the_hub_keeps_the_streams_with_queries_in_flight_as_telemetry_says() -> None:
    async def scenario() -> None:
        hub, session = _hub_with_n1()
        session.ordered_load(KEY, SHA)
        session.report(_status(mesh_pb2.READY))

        def telemetry(in_flight: int) -> mesh_pb2.NodeMessage:
            t = mesh_pb2.Telemetry()
            t.models.add(model="m", variant="default", in_flight=in_flight)
            return mesh_pb2.NodeMessage(telemetry=t)

        hub._on_message(session, telemetry(3))
        assert live_in_flight(hub.flying) == {"n1": {KEY: 3.0}}
        hub._on_message(session, telemetry(0))
        assert hub.flying == {} and live_in_flight(hub.flying) == {}
        hub._on_message(session, telemetry(2))
        hub._on_message(session, mesh_pb2.NodeMessage(copy_status=_status(mesh_pb2.UNLOADED)))
        assert hub.flying == {}  # its figures went with the copy

    asyncio.run(scenario())
