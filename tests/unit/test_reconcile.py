"""The pure Load/Unload decision for one node (controlplane/link/reconcile.py) as a table of
cases over hand-built snapshots; how the hub sends the decisions and remembers what it said is in
tests/unit/test_command_order.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import pytest

from meshserve.controlplane.link.reconcile import (
    ADOPTION_GRACE_S,
    UNLOAD,
    Decision,
    Load,
    Settled,
    Unload,
    load_mark,
    reconcile,
    spec_digest,
)
from meshserve.controlplane.snapshot import NodeView, Snapshot, VariantKey
from meshserve.protos import mesh_pb2
from tests.support.views import node

READY, LOADING, FAILED = mesh_pb2.READY, mesh_pb2.LOADING, mesh_pb2.FAILED
A, B = "a" * 64, "b" * 64  # two artifacts' sha256
ME = "n1"  # the node being reconciled
PLACEMENT_REVISION = 7  # every placement's mod_revision unless a case says otherwise
VIEW_REVISION = 9  # how far the placements view has seen
LOGGING = mesh_pb2.ServingConfig(monitoring=mesh_pb2.MonitoringConfig(log_predictions=True))


def spec(
    variant: str, sha: str = A, serving: mesh_pb2.ServingConfig | None = None
) -> mesh_pb2.ModelSpec:
    return mesh_pb2.ModelSpec(
        name="m",
        variant=variant,
        artifact_uri=f"file:///{variant}.onnx",
        sha256=sha,
        serving=serving,
    )


def digest_of(s: mesh_pb2.ModelSpec) -> str:
    return spec_digest(("m", s.variant), s)


def held(variant: str, state: int, sha: str = A, digest: str = "") -> mesh_pb2.CopyStatus:
    """A copy the node reports (``digest``: the monitoring digest it reports; "" = none)."""
    return mesh_pb2.CopyStatus(
        model="m",
        variant=variant,
        state=state,  # type: ignore[arg-type]
        sha256=sha,
        monitoring_digest=digest,
    )


def said_load(s: mesh_pb2.ModelSpec) -> str:
    return load_mark(s, digest_of(s))


@dataclass(frozen=True)
class Case:
    title: str
    expect: tuple[str, ...]  # the decisions, rendered by show()
    placed: Mapping[str, tuple[str, ...] | tuple[tuple[str, ...], int]] = field(
        default_factory=dict
    )
    # variant -> nodes, or (nodes, desired copies); desired 0 = as many as named
    specs: tuple[mesh_pb2.ModelSpec, ...] | None = None  # None: one spec of sha A per placement
    held: tuple[mesh_pb2.CopyStatus, ...] = ()  # what the node reports
    others: tuple[NodeView, ...] = ()  # the rest of the mesh as the snapshot sees it
    draining: frozenset[str] = frozenset()
    said: Mapping[str, str] = field(default_factory=dict)  # variant -> the mark last sent
    linked_s: float = 60.0  # seconds since the stream was linked
    revisions: Mapping[str, int] | None = None  # None: every placement at PLACEMENT_REVISION


def build(case: Case) -> Snapshot:
    placements: dict[VariantKey, mesh_pb2.Placement] = {}
    for variant, placed in case.placed.items():
        nodes, desired = placed if len(placed) == 2 and isinstance(placed[1], int) else (placed, 0)
        assert isinstance(nodes, tuple)
        placements[("m", variant)] = mesh_pb2.Placement(nodes=nodes, desired_copies=desired)
    specs = case.specs if case.specs is not None else tuple(spec(v) for v in case.placed)
    revisions = case.revisions
    if revisions is None:
        revisions = {v: PLACEMENT_REVISION for v in case.placed}
    return Snapshot(
        models=MappingProxyType({("m", s.variant or "default"): s for s in specs}),
        placements=MappingProxyType(placements),
        nodes=MappingProxyType({n.node_id: n for n in case.others}),
        placement_revisions=MappingProxyType({("m", v): r for v, r in revisions.items()}),
        placements_revision=VIEW_REVISION,
        draining=case.draining,
    )


def show(decision: Decision) -> str:
    if isinstance(decision, Load):
        load = decision.message().load
        return (
            f"load {load.model}/{load.variant} sha={load.sha256[:2]} rev={load.placement_revision}"
        )
    if isinstance(decision, Unload):
        unload = decision.message().unload
        return f"unload {unload.model}/{unload.variant} rev={unload.placement_revision}"
    return f"settled m/{decision.key[1]}"


def replacement(node_id: str, state: int) -> NodeView:
    return node(node_id, copies={("m", "a"): state})


CASES = [
    # -- loads
    Case("nothing placed and nothing held: nothing to say", ()),
    Case("a variant placed on other nodes only: nothing to say", (), placed={"a": ("n2",)}),
    Case(
        "placed here and not held: Load with the spec's sha256 and the placement's revision",
        ("load m/a sha=aa rev=7",),
        placed={"a": (ME, "n2")},
    ),
    Case(
        "placed here but its spec is gone (model removed, placement not yet): nothing, a held "
        "copy stays",
        (),
        placed={"a": (ME,)},
        specs=(),
        held=(held("a", READY),),
    ),
    Case(
        "placed here with no placement revision in view: the Load carries the view's revision",
        ("load m/a sha=aa rev=9",),
        placed={"a": (ME,)},
        revisions={},
    ),
    Case(
        "the spec names no variant: the Load names the placement's variant",
        ("load m/default sha=aa rev=7",),
        placed={"default": (ME,)},
        specs=(mesh_pb2.ModelSpec(name="m", artifact_uri="file:///m.onnx", sha256=A),),
    ),
    Case(
        "a Load of the same artifact already said and not reported on: not repeated",
        (),
        placed={"a": (ME,)},
        said={"a": said_load(spec("a"))},
    ),
    Case(
        "a Load of an older artifact was said: the new artifact is said",
        ("load m/a sha=bb rev=7",),
        placed={"a": (ME,)},
        specs=(spec("a", B),),
        said={"a": said_load(spec("a", A))},
    ),
    Case(
        "an Unload was said, then the variant was placed here again: Load",
        ("load m/a sha=aa rev=7",),
        placed={"a": (ME,)},
        said={"a": UNLOAD},
    ),
    # -- copies the node holds of what is placed on it
    Case(
        "held READY as specified: settled, nothing sent",
        ("settled m/a",),
        placed={"a": (ME,)},
        held=(held("a", READY),),
    ),
    Case(
        "held READY, the spec's sha256 in capitals: the same artifact, settled",
        ("settled m/a",),
        placed={"a": (ME,)},
        specs=(spec("a", A.upper()),),
        held=(held("a", READY),),
    ),
    Case(
        "held while LOADING the placed artifact: settled, not told again",
        ("settled m/a",),
        placed={"a": (ME,)},
        held=(held("a", LOADING),),
    ),
    Case(
        "a FAILED copy of the placed artifact: settled; told again only once it reports anew",
        ("settled m/a",),
        placed={"a": (ME,)},
        held=(held("a", FAILED),),
    ),
    Case(
        "held READY but the artifact changed: Load of the new sha256 replaces it",
        ("load m/a sha=bb rev=7",),
        placed={"a": (ME,)},
        specs=(spec("a", B),),
        held=(held("a", READY, sha=A),),
    ),
    Case(
        "a FAILED copy of an older artifact: Load of the new sha256",
        ("load m/a sha=bb rev=7",),
        placed={"a": (ME,)},
        specs=(spec("a", B),),
        held=(held("a", FAILED, sha=A),),
    ),
    Case(
        "held LOADING an older artifact: Load of the new sha256",
        ("load m/a sha=bb rev=7",),
        placed={"a": (ME,)},
        specs=(spec("a", B),),
        held=(held("a", LOADING, sha=A),),
    ),
    Case(
        "held READY, monitoring settings changed since: Load again to apply them",
        ("load m/a sha=aa rev=7",),
        placed={"a": (ME,)},
        specs=(spec("a", serving=LOGGING),),
        held=(held("a", READY, digest=""),),
    ),
    Case(
        "held READY with the monitoring settings of the spec: settled",
        ("settled m/a",),
        placed={"a": (ME,)},
        specs=(spec("a", serving=LOGGING),),
        held=(held("a", READY, digest=digest_of(spec("a", serving=LOGGING))),),
    ),
    Case(
        "held LOADING with other monitoring settings: settled (a copy reports them once READY)",
        ("settled m/a",),
        placed={"a": (ME,)},
        specs=(spec("a", serving=LOGGING),),
        held=(held("a", LOADING, digest=""),),
    ),
    # -- copies no placement puts on the node
    Case(
        "held but its placement is gone: Unload at the view's revision",
        ("unload m/a rev=9",),
        held=(held("a", READY),),
    ),
    Case(
        "held but the placement names other nodes: Unload at the placement's revision",
        ("unload m/a rev=7",),
        placed={"a": ("n2",)},
        held=(held("a", READY),),
    ),
    Case(
        "held LOADING, placed elsewhere: Unload",
        ("unload m/a rev=7",),
        placed={"a": ("n2",)},
        held=(held("a", LOADING),),
    ),
    Case(
        "a FAILED copy placed nowhere: Unload",
        ("unload m/a rev=9",),
        held=(held("a", FAILED),),
    ),
    Case(
        "an Unload already said and not reported on: not repeated",
        (),
        placed={"a": ("n2",)},
        held=(held("a", READY),),
        said={"a": UNLOAD},
    ),
    Case(
        "a Load was said, then the placement moved away: Unload",
        ("unload m/a rev=7",),
        placed={"a": ("n2",)},
        held=(held("a", LOADING),),
        said={"a": said_load(spec("a"))},
    ),
    # -- adoption: a node back from a network cut keeps what the leader can adopt
    Case(
        "stream just linked, READY copy of a placement short of copies: kept for adoption",
        (),
        placed={"a": (("n2",), 2)},
        held=(held("a", READY),),
        linked_s=1.0,
    ),
    Case(
        "READY copy of a placement short of copies, the adoption grace over: Unload",
        ("unload m/a rev=7",),
        placed={"a": (("n2",), 2)},
        held=(held("a", READY),),
        linked_s=ADOPTION_GRACE_S,
    ),
    Case(
        "stream just linked, LOADING copy of a placement short of copies: Unload (only READY "
        "copies are adopted)",
        ("unload m/a rev=7",),
        placed={"a": (("n2",), 2)},
        held=(held("a", LOADING),),
        linked_s=1.0,
    ),
    Case(
        "stream just linked, READY copy of a placement with all its copies: Unload",
        ("unload m/a rev=7",),
        placed={"a": (("n2", "n3"), 2)},
        held=(held("a", READY),),
        linked_s=1.0,
    ),
    Case(
        "stream just linked, READY copy of a removed placement: Unload (nothing to adopt into)",
        ("unload m/a rev=9",),
        held=(held("a", READY),),
        linked_s=1.0,
    ),
    # -- make before break: a draining node's READY copy stays until replacements are READY
    Case(
        "draining, the replacement still LOADING: the READY copy stays",
        (),
        placed={"a": ("n2",)},
        held=(held("a", READY),),
        others=(replacement("n2", LOADING),),
        draining=frozenset({ME}),
    ),
    Case(
        "draining, no replacement reported at all: the READY copy stays",
        (),
        placed={"a": ("n2",)},
        held=(held("a", READY),),
        draining=frozenset({ME}),
    ),
    Case(
        "draining, the replacement READY: Unload",
        ("unload m/a rev=7",),
        placed={"a": ("n2",)},
        held=(held("a", READY),),
        others=(replacement("n2", READY),),
        draining=frozenset({ME}),
    ),
    Case(
        "draining, one of two placed replacements READY: the READY copy stays",
        (),
        placed={"a": ("n2", "n3")},
        held=(held("a", READY),),
        others=(replacement("n2", READY), replacement("n3", LOADING)),
        draining=frozenset({ME}),
    ),
    Case(
        "draining, both placed replacements READY: Unload",
        ("unload m/a rev=7",),
        placed={"a": ("n2", "n3")},
        held=(held("a", READY),),
        others=(replacement("n2", READY), replacement("n3", READY)),
        draining=frozenset({ME}),
    ),
    Case(
        "draining, one copy desired and one of two placed replacements READY: Unload",
        ("unload m/a rev=7",),
        placed={"a": (("n2", "n3"), 1)},
        held=(held("a", READY),),
        others=(replacement("n2", READY), replacement("n3", LOADING)),
        draining=frozenset({ME}),
    ),
    Case(
        "draining, the only replacement READY is on another draining node: the copy stays",
        (),
        placed={"a": ("n2",)},
        held=(held("a", READY),),
        others=(replacement("n2", READY),),
        draining=frozenset({ME, "n2"}),
    ),
    Case(
        "draining, the placement still names this node: the copy stays (placed here)",
        ("settled m/a",),
        placed={"a": (ME,)},
        held=(held("a", READY),),
        draining=frozenset({ME}),
    ),
    Case(
        "draining, a FAILED copy: Unload at once (nothing to hand over)",
        ("unload m/a rev=7",),
        placed={"a": ("n2",)},
        held=(held("a", FAILED),),
        others=(replacement("n2", LOADING),),
        draining=frozenset({ME}),
    ),
    Case(
        "draining, a LOADING copy: Unload at once (it serves nothing)",
        ("unload m/a rev=7",),
        placed={"a": ("n2",)},
        held=(held("a", LOADING),),
        others=(replacement("n2", LOADING),),
        draining=frozenset({ME}),
    ),
    Case(
        "draining, the variant removed: Unload (nothing to hand over)",
        ("unload m/a rev=9",),
        held=(held("a", READY),),
        draining=frozenset({ME}),
    ),
    Case(
        "another node draining, this one not: its copy placed elsewhere goes at once",
        ("unload m/a rev=7",),
        placed={"a": ("n2",)},
        held=(held("a", READY),),
        others=(replacement("n2", LOADING),),
        draining=frozenset({"n3"}),
    ),
    # -- several variants at once: Loads in placement order, then Unloads in held order
    Case(
        "three variants: one settled, one to load, one to unload",
        ("settled m/a", "load m/b sha=bb rev=7", "unload m/c rev=9"),
        placed={"a": (ME,), "b": (ME, "n2")},
        specs=(spec("a"), spec("b", B)),
        held=(held("a", READY), held("c", READY)),
    ),
    Case(
        "two variants to load and two to unload, one unload already said",
        (
            "load m/b sha=aa rev=4",
            "load m/a sha=aa rev=5",
            "unload m/d rev=9",
        ),
        placed={"b": (ME,), "a": (ME,), "c": ("n2",)},
        held=(held("c", READY), held("d", FAILED)),
        said={"c": UNLOAD},
        revisions={"b": 4, "a": 5, "c": 6},
    ),
    Case(
        "draining with two variants: the one whose replacement is READY goes, the other stays",
        ("unload m/a rev=7",),
        placed={"a": ("n2",), "b": ("n3",)},
        held=(held("a", READY), held("b", READY)),
        others=(
            node("n2", copies={("m", "a"): READY}),
            node("n3", copies={("m", "b"): LOADING}),
        ),
        draining=frozenset({ME}),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.title for c in CASES])
def test_reconcile(case: Case) -> None:
    snapshot = build(case)
    copies = {(c.model, c.variant): c for c in case.held}
    said = {("m", v): mark for v, mark in case.said.items()}
    decisions = reconcile(snapshot, ME, copies, said=said, linked_s=case.linked_s)
    assert tuple(show(d) for d in decisions) == case.expect


def test_a_load_carries_everything_the_node_needs_and_the_mark_to_remember() -> None:
    s = mesh_pb2.ModelSpec(
        name="m",
        variant="a",
        artifact_uri="https://store/m-a.onnx",
        sha256=A,
        execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        serving=LOGGING,
        drift_reference=mesh_pb2.DriftProfile(rows=10),
    )
    snapshot = Snapshot(
        models={("m", "a"): s},
        placements={("m", "a"): mesh_pb2.Placement(nodes=[ME])},
        placement_revisions={("m", "a"): 12},
    )
    [decision] = reconcile(snapshot, ME, {})
    assert isinstance(decision, Load)
    expected = mesh_pb2.LoadModel(
        model="m",
        variant="a",
        artifact_uri="https://store/m-a.onnx",
        sha256=A,
        execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        serving=LOGGING,
        placement_revision=12,
        drift_reference=mesh_pb2.DriftProfile(rows=10),
    )
    assert decision.message().load == expected
    assert decision.mark == f"load:{A}:{digest_of(s)}" and digest_of(s) != ""
    [settled] = reconcile(snapshot, ME, {("m", "a"): held("a", READY, digest=digest_of(s))})
    assert settled == Settled(("m", "a"), decision.mark), "settled remembers the same mark"


def test_the_digest_passed_in_decides_whether_monitoring_changed() -> None:
    snapshot = Snapshot(
        models={("m", "a"): spec("a")},
        placements={("m", "a"): mesh_pb2.Placement(nodes=[ME])},
    )
    copy = {("m", "a"): held("a", READY, digest="")}
    assert [show(d) for d in reconcile(snapshot, ME, copy)] == ["settled m/a"]
    decisions = reconcile(snapshot, ME, copy, digest=lambda key, s: "f00d")
    assert [show(d) for d in decisions] == ["load m/a sha=aa rev=0"]
