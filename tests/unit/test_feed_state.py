"""The routing feed's pure parts: the subscriber's FeedState, and the publisher's entries, diff
and bounded history."""

from __future__ import annotations

from meshserve.common.routing.feed import FeedState, alias_key, model_key, node_key
from meshserve.protos import mesh_pb2


def _spec(name: str, variant: str = "default") -> mesh_pb2.FeedEntry:
    spec = mesh_pb2.ModelSpec(name=name, variant=variant, artifact_uri=f"file:///{name}.onnx")
    return mesh_pb2.FeedEntry(key=model_key(name, variant), model=spec)


def _node(node_id: str, *models: str, in_flight: int = 0) -> mesh_pb2.FeedEntry:
    node = mesh_pb2.FeedNode(node_id=node_id, labels={"zone": "a"}, direct_address="h:1")
    node.replicas.append("cp-1")
    for name in models:
        node.copies.append(mesh_pb2.CopyStatus(model=name, variant="default", state=mesh_pb2.READY))
        node.load.append(
            mesh_pb2.ModelTelemetry(model=name, variant="default", in_flight=in_flight)
        )
    return mesh_pb2.FeedEntry(key=node_key(node_id), node=node)


def _alias(model: str, version: str) -> mesh_pb2.FeedEntry:
    alias = mesh_pb2.Alias(model=model, alias="live", version=version)
    return mesh_pb2.FeedEntry(key=alias_key(model, "live"), alias=alias)


def _update(
    revision: int, *entries: mesh_pb2.FeedEntry, full: bool = False, removed: tuple[str, ...] = ()
) -> mesh_pb2.FeedUpdate:
    return mesh_pb2.FeedUpdate(
        revision=revision,
        full=full,
        entries=entries,
        removed=removed,
        replica_id="cp-1",
        replicas=[mesh_pb2.ReplicaInfo(replica_id="cp-1", address="127.0.0.1:1")],
        heartbeat_ms=500,
    )


def test_a_full_view_then_deltas_and_removals() -> None:
    state = FeedState()
    assert not state.has_view and state.received_at is None
    assert state.apply(_update(1, _spec("a"), _spec("b"), _node("n1", "a"), full=True))
    assert state.has_view and state.revision == 1 and state.heartbeat_s == 0.5
    assert state.replica_id == "cp-1" and [r.address for r in state.replicas] == ["127.0.0.1:1"]
    snap = state.snapshot()
    assert set(snap.models) == {("a", "default"), ("b", "default")}
    assert [n.node_id for n in snap.ready_nodes(("a", "default"))] == ["n1"]
    assert snap.nodes["n1"].labels == {"zone": "a"} and snap.nodes["n1"].replicas == {"cp-1"}
    load = state.load("n1", ("a", "default"))
    assert load is not None and load.in_flight == 0

    # a delta: n1 now also holds b (busier), an alias appears, model a is gone
    state.apply(
        _update(
            2,
            _node("n1", "a", "b", in_flight=3),
            _alias("b", "v2"),
            removed=(model_key("a", "default"),),
        )
    )
    snap = state.snapshot()
    assert set(snap.models) == {("b", "default")}
    assert snap.ready_count(("b", "default")) == 1
    assert snap.aliases[("b", "live")].version == "v2"
    load = state.load("n1", ("b", "default"))
    assert load is not None and load.in_flight == 3

    # the node's entry removed: its copies and load go with it
    state.apply(_update(3, removed=(node_key("n1"),)))
    assert state.snapshot().nodes == {} and state.load("n1", ("b", "default")) is None
    assert state.keys() == {model_key("b", "default"), alias_key("b", "live")}

    # a full view replaces everything held
    state.apply(_update(9, _spec("c"), full=True))
    assert set(state.snapshot().models) == {("c", "default")} and state.snapshot().aliases == {}
    assert state.revision == 9


def test_the_snapshot_is_rebuilt_only_after_a_change() -> None:
    state = FeedState()
    state.apply(_update(1, _spec("a"), _node("n1", "a"), full=True))
    first = state.snapshot()
    assert state.snapshot() is first
    before = state.received_at
    assert not state.apply(_update(1))  # a heartbeat: nothing changed
    assert state.snapshot() is first
    assert state.received_at is not None and before is not None and state.received_at >= before
    assert state.apply(_update(2, _spec("b")))
    assert state.snapshot() is not first and ("b", "default") in state.snapshot().models


def test_draining_nodes_and_unknown_removals() -> None:
    state = FeedState()
    entry = _node("n1", "a")
    entry.node.draining = True
    state.apply(_update(1, entry, _node("n2", "a"), full=True))
    assert state.snapshot().draining == {"n1"}
    state.apply(_update(2, removed=("node/nobody", "model/x/y")))  # unknown keys: ignored
    assert set(state.snapshot().nodes) == {"n1", "n2"}
