"""The placement policy on hand-built snapshots (pure: no etcd, no network)."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from meshserve.common.policy.config import parse_policy
from meshserve.controlplane.placement.policies.plugins import Resident, Victim
from meshserve.controlplane.placement.scheduler import _frees, plan_placements
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


def test_a_node_relabelled_out_of_the_selector_loses_its_copy_to_one_that_matches() -> None:
    spec = model("m", selector={"tier": "core"})
    snapshot = snap(
        [spec],
        [node("a", labels={"tier": "edge"}), node("b", labels={"tier": "core"})],
        {"m": ["a"]},  # placed while a was labelled core
    )
    plan = plan_placements(snapshot)
    assert list(plan.upserts[("m", "default")].nodes) == ["b"]


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


# -- the eviction step as the policy selects it ------------------------------------------------


def tight_mesh(tight_gib: float, spares: tuple[str, ...]) -> Snapshot:
    """A pinned 2 GiB variant that only fits on ``tight``, which holds one 1 GiB copy of each
    spare variant (each with a second copy on ``roomy``, so each may lose one)."""
    tight = node("tight", memory=int(tight_gib * GiB), labels={"pin": "yes"})
    roomy = node("roomy", memory=8 * GiB)
    models = {(s, "default"): model(s, copies=2, size=GiB) for s in spares}
    models[("pinned", "default")] = model("pinned", size=2 * GiB, selector={"pin": "yes"})
    placements = {
        (s, "default"): mesh_pb2.Placement(
            model=s, variant="default", nodes=["tight", "roomy"], desired_copies=2
        )
        for s in spares
    }
    return Snapshot(
        models=MappingProxyType(models),
        placements=MappingProxyType(placements),
        nodes=MappingProxyType({"tight": tight, "roomy": roomy}),
    )


def test_the_eviction_reports_what_the_built_in_plugin_valued_the_copy_at() -> None:
    [ev] = plan_placements(tight_mesh(2.5, ("spare",))).evictions
    # No status for the copy on the node (reload 1 s assumed), idle: (1 + 0) x (1 + 0.05) x size.
    assert (ev.key, ev.node_id) == (("spare", "default"), "tight")
    assert ev.value == pytest.approx(1.05 * GiB)


def test_a_policy_selecting_never_keeps_every_copy_and_leaves_the_variant_short() -> None:
    policy = parse_policy("name: p\ndefault:\n  eviction: {plugin: never}\n")
    plan = plan_placements(tight_mesh(2.5, ("spare",)), policy)
    assert plan.evictions == []
    assert list(plan.upserts[("pinned", "default")].nodes) == []
    assert ("spare", "default") not in plan.upserts, "spare keeps both copies"


def test_the_eviction_plugin_is_the_one_of_the_rule_matching_the_short_variant() -> None:
    policy = parse_policy(
        "name: p\ndefault:\n  eviction: {plugin: never}\n"
        "rules:\n  - models: [pinned]\n    eviction: {plugin: cheapest_reload}\n"
    )
    [ev] = plan_placements(tight_mesh(2.5, ("spare",)), policy).evictions
    assert (ev.key, ev.for_key) == (("spare", "default"), ("pinned", "default"))


@pytest.mark.parametrize(
    ("max_victims", "evicted"),
    [
        ("", [("a", "tight"), ("b", "tight")]),
        ("max_victims: 2", [("a", "tight"), ("b", "tight")]),
        ("max_victims: 1", []),
    ],
    ids=["no bound: both 1 GiB copies go", "a bound of 2 allows both", "a bound of 1: none go"],
)
def test_max_victims_bounds_the_copies_one_placement_takes_off_a_node(
    max_victims: str, evicted: list[tuple[str, str]]
) -> None:
    # 2.5 GiB with 2 GiB placed: 0.5 GiB free, so the 2 GiB copy needs both 1 GiB copies gone.
    policy = parse_policy(
        f"name: p\ndefault:\n  eviction: {{plugin: cheapest_reload, {max_victims}}}\n"
    )
    plan = plan_placements(tight_mesh(2.5, ("a", "b")), policy)
    assert [(ev.key[0], ev.node_id) for ev in plan.evictions] == evicted
    assert list(plan.upserts[("pinned", "default")].nodes) == (["tight"] if evicted else [])


A, B = ("a", "default"), ("b", "default")
RESIDENTS = (Resident(A, 1.0), Resident(B, 2.0))
ANSWERS = [
    ("one resident that frees enough", (Victim(A, 0.0),), 1.0, True),
    ("two residents that free enough together", (Victim(A, 0.0), Victim(B, 0.0)), 3.0, True),
    ("no answer", (), 1.0, False),
    ("too little freed", (Victim(A, 0.0),), 1.5, False),
    ("a copy that is not a resident", (Victim(("c", "default"), 0.0),), 0.5, False),
    ("the same copy twice", (Victim(B, 0.0), Victim(B, 0.0)), 3.0, False),
]


@pytest.mark.parametrize(
    ("victims", "missing", "applied"), [a[1:] for a in ANSWERS], ids=[a[0] for a in ANSWERS]
)
def test_an_eviction_answer_is_applied_only_if_it_frees_enough_with_residents(
    victims: tuple[Victim, ...], missing: float, applied: bool
) -> None:
    assert _frees(victims, RESIDENTS, missing) is applied
