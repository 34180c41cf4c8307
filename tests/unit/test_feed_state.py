"""The routing feed's pure parts: the subscriber's FeedState, and the publisher's entries, diff
and bounded history."""

from __future__ import annotations

from meshserve.common.routing.feed import FeedState, alias_key, model_key, node_key
from meshserve.common.routing.view import NodeView, Snapshot
from meshserve.controlplane.dataplane.feed import (
    EntryBuilder,
    FeedHistory,
    FeedPublisher,
    build_entries,
    diff_entries,
    entry_model,
    filter_entry,
)
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


# -- the publisher's pure parts ----------------------------------------------------------------


def _view(node_id: str, *copies: tuple[str, mesh_pb2.CopyState]) -> NodeView:
    status = {
        (model, "default"): mesh_pb2.CopyStatus(
            model=model, variant="default", state=state, reason="why", memory_bytes=7
        )
        for model, state in copies
    }
    return NodeView(
        node_id=node_id,
        labels={"zone": "a"},
        hardware=mesh_pb2.Hardware(cpu_cores=2),
        direct_address="",
        replicas=frozenset({"cp-1"}),
        copies=status,
    )


def _snapshot(*nodes: NodeView, models: tuple[str, ...] = ("a", "b"), live: str = "v1") -> Snapshot:
    specs = {}
    for name in models:
        spec = mesh_pb2.ModelSpec(name=name, variant="default", retry_requests={"": 1})
        spec.drift_reference.features.add(name="x")
        specs[(name, "default")] = spec
    placements = {
        (name, "default"): mesh_pb2.Placement(
            model=name, variant="default", nodes=["n1"], desired_copies=1, failed={"n2": "x"}
        )
        for name in models
    }
    aliases = {("a", "live"): mesh_pb2.Alias(model="a", alias="live", version=live)}
    return Snapshot(
        models=specs,
        placements=placements,
        nodes={n.node_id: n for n in nodes},
        draining=frozenset({"n2"}),
        aliases=aliases,
    )


def _telemetry(node_id: str, key: tuple[str, str]) -> mesh_pb2.ModelTelemetry | None:
    return mesh_pb2.ModelTelemetry(
        model=key[0], variant=key[1], in_flight=2, requests=99, queue_depth=1, latency_p99_ms=5
    )


def test_entries_carry_what_a_router_needs_and_nothing_heavy() -> None:
    snap = _snapshot(
        _view("n1", ("a", mesh_pb2.READY), ("b", mesh_pb2.LOADING)),
        _view("n2", ("b", mesh_pb2.READY)),
        _view("n3", ("a", mesh_pb2.FAILED)),  # no READY copy: no entry
    )
    entries = build_entries(snap, _telemetry)
    assert set(entries) == {
        "model/a/default",
        "model/b/default",
        "placement/a/default",
        "placement/b/default",
        "alias/a/live",
        "node/n1",
        "node/n2",
    }
    spec = entries["model/a/default"].model
    assert not spec.HasField("drift_reference") and not spec.retry_requests
    assert not entries["placement/a/default"].placement.failed
    n1 = entries["node/n1"].node
    assert [(c.model, c.state) for c in n1.copies] == [("a", mesh_pb2.READY)]
    assert n1.copies[0].reason == "" and n1.copies[0].memory_bytes == 0
    assert [(t.model, t.in_flight, t.queue_depth, t.requests) for t in n1.load] == [("a", 2, 1, 0)]
    assert not n1.draining and entries["node/n2"].node.draining
    assert n1.replicas == ["cp-1"] and n1.hardware.cpu_cores == 2


def test_diff_and_filter() -> None:
    assert diff_entries({"a": b"1", "b": b"2"}, {"a": b"1", "b": b"3", "c": b"4"}) == (
        ["b", "c"],
        [],
    )
    assert diff_entries({"a": b"1", "b": b"2"}, {"b": b"2"}) == ([], ["a"])
    entries = build_entries(
        _snapshot(_view("n1", ("a", mesh_pb2.READY), ("b", mesh_pb2.READY))), _telemetry
    )
    only_b = {"b"}.__contains__
    node = filter_entry(entries["node/n1"], only_b)
    assert node is not None
    assert [c.model for c in node.node.copies] == ["b"] and [t.model for t in node.node.load] == [
        "b"
    ]
    assert filter_entry(entries["model/a/default"], only_b) is None
    assert filter_entry(entries["alias/a/live"], only_b) is None
    assert filter_entry(entries["placement/b/default"], only_b) is entries["placement/b/default"]
    assert filter_entry(entries["node/n1"], {"c"}.__contains__) is None
    assert filter_entry(entries["node/n1"], None) is entries["node/n1"]
    assert entry_model("alias/a/live") == "a" and entry_model("model/b/default") == "b"


def test_history_is_bounded_by_count_and_bytes() -> None:
    history = FeedHistory(max_revisions=4, max_bytes=10_000)
    for revision in range(1, 11):
        history.append(revision, [f"node/n{revision}"])
    assert len(history) == 4 and history.floor == 6
    assert history.since(5) is None  # fell out: a full view
    assert history.since(6) == {"node/n7", "node/n8", "node/n9", "node/n10"}
    assert history.since(9) == {"node/n10"} and history.since(10) == set()
    small = FeedHistory(max_revisions=1000, max_bytes=1000)
    for revision in range(1, 200):
        small.append(revision, ["x" * 100])
        assert small.bytes <= 1000
    assert small.since(1) is None and small.since(198) == {"x" * 100}


def test_the_publisher_bumps_its_revision_only_on_change_and_merges_deltas() -> None:
    state = {"snap": _snapshot(_view("n1", ("a", mesh_pb2.READY)))}
    replicas = [mesh_pb2.ReplicaInfo(replica_id="cp-1", address="127.0.0.1:1")]
    pub = FeedPublisher(lambda: state["snap"], _telemetry, lambda: replicas, "cp-1")
    assert pub.publish() and pub.revision == 1
    assert not pub.publish() and pub.revision == 1  # same view: no revision
    client = FeedState()
    client.apply(pub.full_view(None))
    assert client.revision == 1 and client.snapshot().ready_count(("a", "default")) == 1

    state["snap"] = _snapshot(_view("n1", ("a", mesh_pb2.READY)), live="v2")
    assert pub.publish()
    state["snap"] = _snapshot(_view("n1", ("a", mesh_pb2.READY)), live="v2", models=("a",))
    assert pub.publish() and pub.revision == 3
    delta = pub.delta(1, None)
    assert delta is not None and not delta.full
    assert [e.key for e in delta.entries] == ["alias/a/live"]
    assert sorted(delta.removed) == ["model/b/default", "placement/b/default"]
    client.apply(delta)
    assert client.revision == 3 and client.snapshot().aliases[("a", "live")].version == "v2"
    assert client.keys() == set(pub.entries)

    only_a = {"a"}.__contains__
    tenant = pub.delta(1, only_a)
    assert tenant is not None and not tenant.removed  # b was never this subscriber's to see
    assert pub.delta(0, None) is not None  # the whole history is still held
    for version in range(4, 80):  # many changes: the first revisions fall out
        state["snap"] = _snapshot(
            _view("n1", ("a", mesh_pb2.READY)), live=f"v{version}", models=("a",)
        )
        pub.publish()
    assert len(pub.history) <= 64 and pub.delta(1, None) is None
    full = pub.full_view(only_a)
    assert full.full and full.replica_id == "cp-1" and full.heartbeat_ms == 1000
    assert {e.key for e in full.entries} == set(pub.entries)  # only model a is left


def test_entries_are_rebuilt_only_where_their_source_changed() -> None:
    snap = _snapshot(_view("n1", ("a", mesh_pb2.READY)), _view("n2", ("b", mesh_pb2.READY)))
    busy = {"n1": 0}

    def load(node_id: str, key: tuple[str, str]) -> mesh_pb2.ModelTelemetry | None:
        return mesh_pb2.ModelTelemetry(model=key[0], variant=key[1], in_flight=busy.get(node_id, 0))

    builder = EntryBuilder()
    first = builder.build(snap, load)
    again = builder.build(snap, load)
    assert all(again[key][0] is first[key][0] for key in first)  # nothing rebuilt
    busy["n1"] = 5  # live load moved on n1 only
    moved = builder.build(snap, load)
    assert moved["node/n1"][0] is not first["node/n1"][0]
    assert moved["node/n1"][0].node.load[0].in_flight == 5
    assert moved["node/n2"][0] is first["node/n2"][0]
    # a new snapshot of new objects: rebuilt (n2 is gone)
    newer = _snapshot(_view("n1", ("a", mesh_pb2.READY)), live="v9")
    rebuilt = builder.build(newer, load)
    assert "node/n2" not in rebuilt
    assert rebuilt["alias/a/live"][0].alias.version == "v9"
    assert diff_entries(
        {k: b for k, (_, b) in moved.items()}, {k: b for k, (_, b) in rebuilt.items()}
    )[1] == ["node/n2"]
