"""Incremental reconcile: what changed between two snapshots (controlplane/link/changes.py), which
nodes that concerns, and the hub deciding only those (controlplane/link/scope.py) yet sending
exactly what a full pass over every node sends -- the unload safety floor included."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType

import pytest

from meshserve.controlplane.link.changes import changes, concerned
from meshserve.controlplane.link.hub import Hub
from meshserve.controlplane.link.reconcile import ADOPTION_GRACE_S, placed_on
from meshserve.controlplane.link.scope import ReconcileScope
from meshserve.controlplane.link.session import NodeSession
from meshserve.controlplane.snapshot import NodeView, Snapshot, VariantKey
from meshserve.protos import mesh_pb2
from tests.support.fake_registry import FakeRegistry
from tests.support.views import node

READY, LOADING = mesh_pb2.READY, mesh_pb2.LOADING
A, B = "a" * 64, "b" * 64
X, Y, Z = ("m", "x"), ("m", "y"), ("m", "z")


def spec(key: VariantKey, sha: str = A) -> mesh_pb2.ModelSpec:
    return mesh_pb2.ModelSpec(name=key[0], variant=key[1], artifact_uri="file:///m", sha256=sha)


def view(
    placed: Mapping[VariantKey, tuple[str, ...]],
    *,
    nodes: Iterable[NodeView] = (),
    draining: Iterable[str] = (),
    specs: Mapping[VariantKey, mesh_pb2.ModelSpec] | None = None,
    revisions: Mapping[VariantKey, int] | None = None,
) -> Snapshot:
    return Snapshot(
        models=MappingProxyType(dict(specs) if specs is not None else {k: spec(k) for k in placed}),
        placements=MappingProxyType(
            {k: mesh_pb2.Placement(nodes=list(n)) for k, n in placed.items()}
        ),
        nodes=MappingProxyType({n.node_id: n for n in nodes}),
        placement_revisions=MappingProxyType(dict(revisions or {k: 1 for k in placed})),
        placements_revision=10,
        draining=frozenset(draining),
    )


# -- changes(): a table of cases -------------------------------------------------------------

BASE = view({X: ("n1", "n2"), Y: ("n3",)}, nodes=[node("n1", copies={X: READY}), node("n4")])

CHANGES = [
    ("the same snapshot: nothing", BASE, {}),
    (
        "equal values in new objects (a rebuilt view): nothing",
        view({X: ("n1", "n2"), Y: ("n3",)}, nodes=[node("n1", copies={X: READY}), node("n4")]),
        {},
    ),
    (
        "a placement moved: the variant, and the nodes it named before and names now",
        view({X: ("n2", "n5"), Y: ("n3",)}, nodes=[node("n1", copies={X: READY}), node("n4")]),
        {"variants": {X}, "placed": {"n1", "n2", "n5"}},
    ),
    (
        "a placement's revision alone: the variant and its nodes",
        replace(BASE, placement_revisions=MappingProxyType({X: 2, Y: 1})),
        {"variants": {X}, "placed": {"n1", "n2"}},
    ),
    (
        "a new artifact (sha256) for a variant: the variant and its nodes",
        replace(BASE, models=MappingProxyType({X: spec(X, B), Y: spec(Y)})),
        {"variants": {X}, "placed": {"n1", "n2"}},
    ),
    (
        "a model removed (spec and placement gone): the variant and the nodes it named",
        view({Y: ("n3",)}, nodes=[node("n1", copies={X: READY}), node("n4")]),
        {"variants": {X}, "placed": {"n1", "n2"}},
    ),
    (
        "a node's copy turned READY: the node, and the variant's READY copies changed",
        replace(
            BASE,
            nodes=MappingProxyType({"n1": BASE.nodes["n1"], "n4": node("n4", copies={Y: READY})}),
        ),
        {"nodes": {"n4"}, "ready": {Y}},
    ),
    (
        "a node's labels changed: the node only",
        replace(
            BASE,
            nodes=MappingProxyType(
                {"n1": BASE.nodes["n1"], "n4": node("n4", labels={"zone": "b"})}
            ),
        ),
        {"nodes": {"n4"}},
    ),
    (
        "a node went: the node, and the variants it held READY",
        replace(BASE, nodes=MappingProxyType({"n4": BASE.nodes["n4"]})),
        {"nodes": {"n1"}, "ready": {X}},
    ),
    (
        "a node drained: its mark",
        replace(BASE, draining=frozenset({"n2"})),
        {"draining": {"n2"}},
    ),
]


@pytest.mark.parametrize(("title", "new", "expect"), CHANGES, ids=[c[0] for c in CHANGES])
def test_changes(title: str, new: Snapshot, expect: Mapping[str, set[object]]) -> None:
    got = changes(BASE, new)
    for name in ("variants", "placed", "nodes", "draining", "ready"):
        assert set(getattr(got, name)) == set(expect.get(name, set())), (title, name)
    assert bool(got) == bool(expect.keys() - {"ready"}), title


def test_concerned_reaches_holders_not_named_and_draining_holders_waiting_on_others() -> None:
    old = view({X: ("n1", "n2")}, draining=["d"])
    holders = {X: {"h", "d"}, Y: {"d"}}
    # X moves to n3: named before/after, and every holder of X (a copy to unload, or to keep)
    new = view({X: ("n1", "n3")}, draining=["d"])
    assert concerned(changes(old, new), old, new, holders) == {"n1", "n2", "n3", "h", "d"}
    # n2's copy of X became READY: the draining holder d may let its copy go; h is not draining
    new = view({X: ("n1", "n2")}, draining=["d"], nodes=[node("n2", copies={X: READY})])
    assert concerned(changes(old, new), old, new, holders) == {"n2", "d"}
    # n2 (named by X) starts draining: d's replacement count changes
    new = view({X: ("n1", "n2")}, draining=["d", "n2"])
    assert concerned(changes(old, new), old, new, holders) == {"n2", "d"}
    # nothing draining: a READY change concerns only its node
    calm_old, calm_new = view({X: ("n1",)}), view({X: ("n1",)}, nodes=[node("n1")])
    assert concerned(changes(calm_old, calm_new), calm_old, calm_new, holders) == {"n1"}


def test_placed_on_indexes_a_nodes_placements_in_placement_order() -> None:
    snap = view({X: ("n1", "n2", "n1"), Y: ("n2",), Z: ("n1",)})
    assert list(placed_on(snap, "n1")) == [X, Z]
    assert list(placed_on(snap, "n2")) == [X, Y]
    assert list(placed_on(snap, "n9")) == []


def test_scope_plans_a_full_pass_first_then_every_full_pass_s() -> None:
    now = [0.0]
    scope = ReconcileScope(30.0, clock=lambda: now[0])
    snap = view({X: ("n1",)})
    assert scope.plan(snap) is None, "first: everything"
    assert scope.plan(snap) == set()
    scope.owe("n7")
    assert scope.plan(snap) == {"n7"}, "owed until decided"
    scope.decided("n7", [Y], fresh=False)
    assert scope.plan(snap) == set() and scope.holders == {Y: {"n7"}}
    scope.decided("n8", [Y], fresh=True)
    assert scope.plan(snap) == {"n8"}, "within the adoption grace: decided by every pass"
    scope.forget("n7")
    scope.forget("n8")
    assert scope.holders == {} and scope.plan(snap) == set()
    now[0] = 30.0
    assert scope.plan(snap) is None, "the safety net"
    assert scope.plan(snap, full=True) is None


# -- the hub: incremental passes send what full passes send ----------------------------------


def _hub(full_pass_s: float) -> Hub:
    return Hub(
        registry=FakeRegistry(),
        replica_id="cp-1",
        lease_ttl_s=3,
        lease_id=lambda: 1,
        snapshot=lambda: Snapshot(),
        replicas=lambda: [],
        full_pass_s=full_pass_s,
        outbox_size=64,
    )


def _link(hub: Hub, node_id: str, linked_s: float = 60.0) -> NodeSession:
    session = NodeSession(mesh_pb2.Hello(node_id=node_id), "cp-1", 64)
    session.started = time.monotonic() - linked_s
    hub.sessions[node_id] = session
    hub.scope.owe(node_id)
    return session


def _drain(hub: Hub) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node_id, session in sorted(hub.sessions.items()):
        while not session.outbox.empty():
            message = session.outbox.get_nowait()
            body = message.WhichOneof("body")
            command = message.load if body == "load" else message.unload
            text = f"{body} {command.variant} {getattr(command, 'sha256', '')[:1]}"
            out.setdefault(node_id, []).append(f"{text} rev={command.placement_revision}")
    return out


def _act(hub: Hub, sent: Mapping[str, list[str]], rng: random.Random, *, slow: bool) -> None:
    """Each node acts on what it was told (Load -> LOADING, then READY; Unload -> UNLOADED)."""
    for node_id, commands in sent.items():
        session = hub.sessions[node_id]
        for command in commands:
            body, variant, sha, _ = command.split(" ")
            state = mesh_pb2.UNLOADED if body == "unload" else (LOADING if slow else READY)
            status = mesh_pb2.CopyStatus(
                model="m", variant=variant, state=state, sha256=(A if sha == "a" else B)
            )
            hub._on_message(session, mesh_pb2.NodeMessage(copy_status=status))


def _mesh_view(hub: Hub) -> list[NodeView]:
    """The nodes as the etcd view would show them: what each session holds."""
    out = []
    for node_id, session in hub.sessions.items():
        copies = {k: c.state for k, c in session.copies.items()}
        out.append(node(node_id, copies=copies))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_incremental_passes_send_exactly_what_full_passes_send(seed: int) -> None:
    """Two hubs over the same nodes and the same sequence of views and reports: one decides
    every node every pass, the other only the nodes each change concerns. Every step they send
    the same commands to the same nodes, and their safety floors agree."""
    rng = random.Random(seed)
    names = [f"n{i:02d}" for i in range(24)]
    variants = [("m", f"v{i}") for i in range(6)]

    async def scenario() -> None:
        full, incremental = _hub(0.0), _hub(1e9)
        for hub in (full, incremental):
            for name in names:
                _link(hub, name)
        placed = {k: tuple(rng.sample(names, 2)) for k in variants}
        shas = {k: A for k in variants}
        revisions = {k: 1 for k in variants}
        draining: set[str] = set()
        removed: dict[VariantKey, tuple[str, ...]] = {}
        mass_removals = 0
        for step in range(60):
            roll = rng.random()
            key = rng.choice(variants)
            if roll < 0.35 and key in placed:
                placed[key] = tuple(rng.sample(names, rng.randint(1, 3)))
                revisions[key] = step + 2
            elif roll < 0.45 and key in placed:
                shas[key] = B if shas[key] == A else A
            elif roll < 0.6:
                draining ^= {rng.choice(names)}
            elif roll < 0.66 and not removed and mass_removals < 2:
                removed, placed = dict(placed), {}  # the store lost its data: a mass unload
                mass_removals += 1
            elif roll < 0.75 and removed:
                placed, removed = removed, {}  # registered again
            mesh = _mesh_view(full)
            snap = view(
                placed,
                nodes=mesh,
                draining=draining,
                specs={k: spec(k, shas[k]) for k in placed},
                revisions={k: revisions[k] for k in placed},
            )
            for hub in (full, incremental):
                hub._snapshot = lambda s=snap: s  # type: ignore[method-assign]
                hub.reconcile(snap)
            sent = _drain(full)
            assert sent == _drain(incremental), f"seed {seed} step {step}"
            assert full.unloads_held() == incremental.unloads_held(), f"step {step}"
            slow = rng.random() < 0.3
            for hub in (full, incremental):
                _act(hub, sent, rng, slow=slow)
            await asyncio.sleep(0)  # the reconciles the reports scheduled
            assert _drain(full) == _drain(incremental), f"seed {seed} step {step} reports"
            if slow:  # the LOADING copies turn READY
                for hub in (full, incremental):
                    ready = {
                        n: [f"load {k[1]} {c.sha256[:1]} rev=0"]
                        for n, s in hub.sessions.items()
                        for k, c in s.copies.items()
                        if c.state == LOADING
                    }
                    _act(hub, ready, rng, slow=False)
                await asyncio.sleep(0)
                assert _drain(full) == _drain(incremental), f"seed {seed} step {step} ready"
        assert incremental.scope.full_passes == 1 and incremental.scope.passes == 59

    asyncio.run(scenario())


def test_a_mass_unload_is_judged_whole_though_only_the_nodes_concerned_are_decided() -> None:
    """Removing every placement concerns only their nodes; their Unloads are the whole change
    (no other node holds a copy), so the floor holds them back; nodes owed nothing are not
    decided; once the view asks for none, the episode ends."""
    alarms: list[str] = []

    async def scenario() -> None:
        hub = _hub(1e9)
        hub.floor._alarm = alarms.append
        for i in range(100):
            _link(hub, f"n{i:03d}")
        placed = {("m", f"v{i}"): (f"n{i:03d}",) for i in range(4)}  # 4 copies on 4 nodes
        snap = view(placed)
        hub._snapshot = lambda: snap  # type: ignore[method-assign]
        hub.reconcile(snap)  # the first pass: full
        sent = _drain(hub)
        assert len(sent) == 4
        _act(hub, sent, random.Random(0), slow=False)
        await asyncio.sleep(0)
        assert _drain(hub) == {}
        empty = view({})
        decided: list[str] = []
        original = hub._decide

        def counted(session: NodeSession, snapshot: Snapshot):  # type: ignore[no-untyped-def]
            decided.append(session.node_id)
            return original(session, snapshot)

        hub._decide = counted  # type: ignore[method-assign]
        hub.reconcile(empty)
        assert sorted(decided) == ["n000", "n001", "n002", "n003"], "only the nodes concerned"
        assert hub.unloads_held() and len(alarms) == 1 and "4 of the 4 copies" in alarms[0]
        assert _drain(hub) == {}, "held back"
        decided.clear()
        hub.reconcile(empty)  # e.g. the maintenance tick: the held Unloads are owed
        assert sorted(decided) == ["n000", "n001", "n002", "n003"] and hub.unloads_held()
        hub.reconcile(snap)  # registered again: no Unload asked, the episode ends
        assert not hub.unloads_held() and _drain(hub) == {}
        assert hub.scope.due == set()

    asyncio.run(scenario())


def test_a_copy_kept_for_adoption_is_unloaded_by_a_pass_once_the_grace_ends() -> None:
    async def scenario() -> None:
        hub = _hub(1e9)
        hello = mesh_pb2.Hello(
            node_id="n1",
            copies=[mesh_pb2.CopyStatus(model="m", variant="x", state=READY, sha256=A)],
        )
        snap = Snapshot(
            models=MappingProxyType({X: spec(X)}),
            placements=MappingProxyType({X: mesh_pb2.Placement(nodes=["n2"], desired_copies=2)}),
        )
        session = NodeSession(hello, "cp-1", 64)
        session.adopt(snap)
        hub.sessions["n1"] = session
        hub.scope.owe("n1")
        hub.reconcile(snap)  # full; within the grace the short placement's copy stays
        assert _drain(hub) == {}
        hub.reconcile(snap)
        assert _drain(hub) == {}, "still fresh"
        session.started -= ADOPTION_GRACE_S  # the grace is over; nothing in the view changed
        hub.reconcile(snap)
        assert _drain(hub) == {"n1": ["unload x  rev=0"]}

    asyncio.run(scenario())


def test_a_command_that_did_not_fit_the_queue_is_sent_by_the_next_pass() -> None:
    hub = _hub(1e9)
    session = _link(hub, "n1")
    hub.reconcile(view({}))
    session.outbox = asyncio.Queue(maxsize=1)
    session.outbox.put_nowait(mesh_pb2.ControlMessage())  # a backed-up stream
    snap = view({X: ("n1",)})
    hub.reconcile(snap)
    session.outbox.get_nowait()
    assert session.outbox.empty(), "did not fit"
    hub.reconcile(snap)  # nothing changed in the view: owed
    assert _drain(hub) == {"n1": ["load x a rev=1"]}
    hub.reconcile(snap)
    assert _drain(hub) == {}


def test_a_draining_nodes_kept_copy_goes_when_its_placement_or_its_mark_changes() -> None:
    """Make before break: d's READY copy of X stays while X's placement (which no longer names d)
    has no READY copy elsewhere. d is named by neither the old nor the new placement, yet a
    move of X to a node already READY concerns it (it holds X); so does d's own mark."""
    hub = _hub(1e9)
    d = _link(hub, "d")
    d.copies[X] = mesh_pb2.CopyStatus(model="m", variant="x", state=READY, sha256=A)
    d.ordered[X] = [A]
    spare = node("b", copies={X: READY})  # a leftover READY copy on b
    waiting = view({X: ("a",)}, draining=["d"], nodes=[spare])
    hub.reconcile(waiting)
    assert _drain(hub) == {}, "kept: a is not READY"
    hub.reconcile(view({X: ("b",)}, draining=["d"], nodes=[spare], revisions={X: 2}))
    assert _drain(hub) == {"d": ["unload x  rev=2"]}
    d.sent.clear()  # the node dropped it (say); kept again while it waits on a
    hub.reconcile(view({X: ("a",)}, draining=["d"], nodes=[spare], revisions={X: 3}))
    assert _drain(hub) == {}
    hub.reconcile(view({X: ("a",)}, nodes=[spare], revisions={X: 3}))  # d is not draining now
    assert _drain(hub) == {"d": ["unload x  rev=3"]}


def test_a_pass_that_fails_midway_leaves_its_nodes_owed() -> None:
    hub = _hub(1e9)
    for name in ("n1", "n2"):
        _link(hub, name)
    hub.reconcile(view({}))
    original = hub._digest
    calls = 0

    def flaky(key: VariantKey, s: mesh_pb2.ModelSpec) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ValueError("a bug in one decision")
        return original(key, s)

    hub._digest = flaky  # type: ignore[method-assign]
    snap = view({X: ("n1",), Y: ("n2",)})
    with pytest.raises(ValueError):
        hub.reconcile(snap)
    assert "n2" in hub.scope.due
    hub.reconcile(snap)  # nothing changed since: the owed node is decided anyway
    assert _drain(hub) == {"n1": ["load x a rev=1"], "n2": ["load y a rev=1"]}
