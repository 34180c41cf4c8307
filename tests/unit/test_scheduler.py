"""The placement policy on hand-built snapshots (pure: no etcd, no network)."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from meshserve.controlplane.placement.scheduler import plan_placements
from meshserve.controlplane.snapshot import NodeView, Snapshot
from meshserve.protos import mesh_pb2
from tests.support.views import GiB, node


def model(
    name: str,
    *,
    copies: int = 1,
    size: int = 0,
    selector: dict[str, str] | None = None,
    providers: tuple[str, ...] = (),
) -> mesh_pb2.ModelSpec:
    return mesh_pb2.ModelSpec(
        name=name,
        variant="default",
        sha256="a" * 64,
        copies=copies,
        size_bytes=size,
        node_selector=selector or {},
        execution_providers=providers,
    )


def snap(
    models: list[mesh_pb2.ModelSpec],
    nodes: list[NodeView],
    placements: dict[str, list[str]] | None = None,
    failed: dict[str, dict[str, str]] | None = None,
) -> Snapshot:
    return Snapshot(
        models={(m.name, m.variant): m for m in models},
        placements={
            (name, "default"): mesh_pb2.Placement(
                model=name, variant="default", nodes=ns, failed=(failed or {}).get(name, {})
            )
            for name, ns in (placements or {}).items()
        },
        nodes={n.node_id: n for n in nodes},
    )


CASES = [
    (
        "two copies go to two nodes",
        snap([model("m", copies=2)], [node("a"), node("b"), node("c")]),
        {"m": ["a", "b"]},
    ),
    (
        "the least loaded node is chosen",
        snap(
            [model("m"), model("busy", copies=2)],
            [node("a"), node("b"), node("c")],
            {"busy": ["a", "b"]},
        ),
        {"m": ["c"]},
    ),
    (
        "selector limits candidates",
        snap(
            [model("m", selector={"tier": "edge"})],
            [node("a", labels={"tier": "core"}), node("b", labels={"tier": "edge"})],
        ),
        {"m": ["b"]},
    ),
    (
        "a model bigger than any node's memory is not placed",
        snap([model("m", size=16 * GiB)], [node("a"), node("b")]),
        {"m": []},
    ),
    (
        "memory already placed counts",
        snap(
            [model("big", size=6 * GiB), model("m", size=4 * GiB)],
            [node("a"), node("b")],
            {"big": ["a"]},
        ),
        {"m": ["b"]},
    ),
    (
        "a required execution provider must exist",
        snap(
            [model("m", providers=("CUDAExecutionProvider",))],
            [node("a"), node("g", providers=("CUDAExecutionProvider", "CPUExecutionProvider"))],
        ),
        {"m": ["g"]},
    ),
    ("a vanished node is replaced", snap([model("m")], [node("b")], {"m": ["gone"]}), {"m": ["b"]}),
    (
        "a failed copy is recorded and placed elsewhere",
        snap(
            [model("m")],
            [node("a", copies={("m", "default"): mesh_pb2.FAILED}), node("b")],
            {"m": ["a"]},
        ),
        {"m": ["b"]},
    ),
    (
        "a node where the copy failed before is not retried",
        snap([model("m")], [node("a"), node("b")], {"m": []}, {"m": {"a": "sha256 mismatch"}}),
        {"m": ["b"]},
    ),
    (
        "copies lowered: extra placements are shed",
        snap([model("m", copies=1)], [node("a"), node("b")], {"m": ["a", "b"]}),
        {"m": ["a"]},
    ),
]


@pytest.mark.parametrize(
    ("snapshot", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_placement(snapshot: Snapshot, expected: dict[str, list[str]]) -> None:
    plan = plan_placements(snapshot)
    for name, nodes in expected.items():
        placement = plan.upserts.get((name, "default")) or snapshot.placements[(name, "default")]
        assert list(placement.nodes) == nodes


def test_failure_reason_is_recorded() -> None:
    snapshot = snap(
        [model("m")], [node("a", copies={("m", "default"): mesh_pb2.FAILED})], {"m": ["a"]}
    )
    placement = plan_placements(snapshot).upserts[("m", "default")]
    assert dict(placement.failed) == {"a": "sha256 mismatch"}
    assert list(placement.nodes) == []


def test_unchanged_placement_is_not_rewritten_and_removed_model_is_deleted() -> None:
    snapshot = snap([model("m")], [node("a")], {"m": ["a"], "old": ["a"]})
    stable = mesh_pb2.Placement(model="m", variant="default", nodes=["a"], desired_copies=1)
    snapshot = Snapshot(
        models=snapshot.models,
        nodes=snapshot.nodes,
        placements={**snapshot.placements, ("m", "default"): stable},
    )
    plan = plan_placements(snapshot)
    assert plan.upserts == {}
    assert plan.deletes == [("old", "default")]


def test_measured_memory_of_loaded_copies_is_used_for_packing() -> None:
    loaded = node("a", memory=8 * GiB, copies={("big", "default"): mesh_pb2.READY})
    measured = mesh_pb2.CopyStatus(
        model="big", variant="default", state=mesh_pb2.READY, sha256="a" * 64, memory_bytes=7 * GiB
    )
    loaded = NodeView(
        loaded.node_id,
        loaded.labels,
        loaded.hardware,
        "",
        loaded.replicas,
        MappingProxyType({("big", "default"): measured}),
    )
    # Declared size is 0 (unknown); the node measured 7 GiB, so a 2 GiB model no longer fits on a.
    snapshot = snap([model("big"), model("m", size=2 * GiB)], [loaded, node("b")], {"big": ["a"]})
    assert list(plan_placements(snapshot).upserts[("m", "default")].nodes) == ["b"]


def test_a_variant_without_a_copy_evicts_the_cheapest_spare_copy_on_a_tight_node() -> None:
    tight = node("tight", memory=3 * GiB, labels={"pin": "yes"})
    roomy = node("roomy", memory=8 * GiB)
    spare = model("spare", copies=2, size=2 * GiB)
    pinned = model("pinned", copies=1, size=2 * GiB, selector={"pin": "yes"})
    snapshot = Snapshot(
        models=MappingProxyType({("spare", "default"): spare, ("pinned", "default"): pinned}),
        placements=MappingProxyType(
            {
                ("spare", "default"): mesh_pb2.Placement(
                    model="spare", variant="default", nodes=["tight", "roomy"], desired_copies=2
                )
            }
        ),
        nodes=MappingProxyType({"tight": tight, "roomy": roomy}),
    )
    plan = plan_placements(snapshot)
    assert list(plan.upserts[("pinned", "default")].nodes) == ["tight"]
    assert list(plan.upserts[("spare", "default")].nodes) == ["roomy"], "spare keeps one copy"
    [ev] = plan.evictions
    assert (ev.key, ev.node_id, ev.for_key) == (
        ("spare", "default"),
        "tight",
        ("pinned", "default"),
    )


def test_no_eviction_below_a_variants_minimum() -> None:
    tight = node("tight", memory=3 * GiB, labels={"pin": "yes"})
    only = model("only", copies=1, size=2 * GiB)
    pinned = model("pinned", copies=1, size=2 * GiB, selector={"pin": "yes"})
    snapshot = Snapshot(
        models=MappingProxyType({("only", "default"): only, ("pinned", "default"): pinned}),
        placements=MappingProxyType(
            {
                ("only", "default"): mesh_pb2.Placement(
                    model="only", variant="default", nodes=["tight"], desired_copies=1
                )
            }
        ),
        nodes=MappingProxyType({"tight": tight}),
    )
    plan = plan_placements(snapshot)
    assert plan.evictions == []
    assert list(plan.upserts[("pinned", "default")].nodes) == []


def test_a_copy_a_node_already_holds_is_adopted_not_reloaded_elsewhere() -> None:
    back = node("back", copies={("m", "default"): mesh_pb2.READY})
    other = node("other", memory=64 * GiB)
    snapshot = Snapshot(
        models=MappingProxyType({("m", "default"): model("m", copies=1)}),
        placements=MappingProxyType(
            {("m", "default"): mesh_pb2.Placement(model="m", variant="default", desired_copies=1)}
        ),
        nodes=MappingProxyType({"back": back, "other": other}),
    )
    assert list(plan_placements(snapshot).upserts[("m", "default")].nodes) == ["back"]
