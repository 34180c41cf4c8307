"""Placement decisions inside one pass (issue 14 §7), on hand-built snapshots: copies of one
variant see each other, a size never declared is estimated before it is measured, a node whose
copies were measured bigger than they fit is re-planned, and eviction takes the cheapest
sufficient set across the candidate nodes (pure: no etcd, no network)."""

from __future__ import annotations

from types import MappingProxyType

from meshserve.controlplane.placement.memory import footprints, load_factor
from meshserve.controlplane.placement.scheduler import plan_placements
from meshserve.controlplane.snapshot import NodeView, Snapshot, VariantKey
from meshserve.protos import mesh_pb2
from tests.support.views import GiB, node

MiB = 1 << 20


def key(name: str) -> VariantKey:
    return (name, "default")


def spec(name: str, *, copies: int = 1, size: int = 0) -> mesh_pb2.ModelSpec:
    return mesh_pb2.ModelSpec(
        name=name, variant="default", sha256="a" * 64, copies=copies, size_bytes=size
    )


def host(
    node_id: str,
    memory_mib: int,
    zone: str = "a",
    **copies: tuple[int, int, int],
) -> NodeView:
    """A node of ``memory_mib`` MiB; ``copies``: model name -> (state, measured MiB, artifact
    MiB reported while fetching)."""
    base = node(node_id, memory=memory_mib * MiB, labels={"zone": zone})
    statuses = {
        key(name): mesh_pb2.CopyStatus(
            model=name,
            variant="default",
            state=state,  # type: ignore[arg-type]
            sha256="a" * 64,
            memory_bytes=measured * MiB,
            bytes_total=artifact * MiB,
        )
        for name, (state, measured, artifact) in copies.items()
    }
    return NodeView(
        base.node_id, base.labels, base.hardware, "", base.replicas, MappingProxyType(statuses)
    )


def mesh(
    models: list[mesh_pb2.ModelSpec],
    nodes: list[NodeView],
    placed: dict[str, list[str]] | None = None,
) -> Snapshot:
    return Snapshot(
        models=MappingProxyType({key(m.name): m for m in models}),
        placements=MappingProxyType(
            {
                key(name): mesh_pb2.Placement(
                    model=name, variant="default", nodes=ns, desired_copies=len(ns)
                )
                for name, ns in (placed or {}).items()
            }
        ),
        nodes=MappingProxyType({n.node_id: n for n in nodes}),
    )


def nodes_of(snapshot: Snapshot, name: str) -> list[str]:
    plan = plan_placements(snapshot)
    placement = plan.upserts.get(key(name)) or snapshot.placements[key(name)]
    return list(placement.nodes)


R, L = mesh_pb2.READY, mesh_pb2.LOADING


def test_two_copies_placed_in_one_pass_go_to_two_zones_under_the_default_policy() -> None:
    snapshot = mesh([spec("m", copies=2)], [host("a1", 600), host("a2", 600), host("b1", 600, "b")])
    assert nodes_of(snapshot, "m") == ["a1", "b1"]


def test_a_size_never_declared_is_estimated_from_the_artifact_a_node_reported() -> None:
    # a (300 MiB) holds a 200 MiB model; m was never declared, but c reported its artifact at
    # 150 MiB while fetching it: m's other copies must not go onto a (200 + 150 > 300).
    snapshot = mesh(
        [spec("big", size=200 * MiB), spec("m", copies=3)],
        [host("a", 300, big=(R, 200, 0)), host("b", 300, "b"), host("c", 600, m=(L, 0, 150))],
        {"big": ["a"], "m": ["c"]},
    )
    assert footprints(snapshot)[key("m")] == 150 * MiB
    assert nodes_of(snapshot, "m") == ["c", "b"], "a is too full once m counts 150 MiB"


def test_the_artifact_estimate_is_scaled_by_the_factor_measured_on_the_mesh() -> None:
    # Two READY copies measured at 2x and 3x their artifacts (median 3x of [2, 3]: the upper
    # middle); m is fetching a 100 MiB artifact on c, never measured.
    snapshot = mesh(
        [spec("p"), spec("q"), spec("m")],
        [
            host("a", 900, p=(R, 200, 100)),
            host("b", 900, q=(R, 300, 100)),
            host("c", 900, m=(L, 0, 100)),
        ],
        {"p": ["a"], "q": ["b"], "m": ["c"]},
    )
    assert load_factor(snapshot) == 3.0
    assert footprints(snapshot)[key("m")] == 300 * MiB
    wild = mesh([spec("p")], [host("a", 900, p=(R, 900, 100))], {"p": ["a"]})
    assert load_factor(wild) == 4.0, "bounded: a measurement gone wrong does not run away"
    assert load_factor(mesh([], [host("a", 900)])) == 1.0, "nothing measured: the file's size"


def test_declared_and_measured_sizes_still_win_over_the_artifact_estimate() -> None:
    snapshot = mesh(
        [spec("d", size=50 * MiB), spec("r")],
        [host("a", 600, d=(L, 0, 80), r=(R, 120, 80))],
        {"d": ["a"], "r": ["a"]},
    )
    sizes = footprints(snapshot)
    assert (sizes[key("d")], sizes[key("r")]) == (50 * MiB, 120 * MiB)


def test_a_copy_measured_bigger_than_its_node_holds_is_re_planned_elsewhere() -> None:
    # m was estimated small; measured at 150 MiB beside a 200 MiB model on a 300 MiB node.
    snapshot = mesh(
        [spec("big", size=200 * MiB), spec("m", copies=2)],
        [
            host("a", 300, big=(R, 200, 0), m=(R, 150, 0)),
            host("b", 600, "b"),
            host("c", 600, "c", m=(R, 150, 0)),
        ],
        {"big": ["a"], "m": ["a", "c"]},
    )
    assert nodes_of(snapshot, "m") == ["c", "b"]
    assert nodes_of(snapshot, "big") == ["a"]
    [relief] = plan_placements(snapshot).relieved
    assert (relief.key, relief.node_id) == (key("m"), "a")
    assert (
        relief.message()
        == "copy on a re-planned: the node's copies measure 350.0 MiB of its 300.0 MiB"
    )


def test_the_only_serving_copy_stays_where_it_is_though_measured_too_big() -> None:
    snapshot = mesh([spec("m")], [host("a", 300, m=(R, 350, 0)), host("b", 600)], {"m": ["a"]})
    assert nodes_of(snapshot, "m") == ["a"]


def test_eviction_takes_the_cheapest_copy_across_the_candidate_nodes() -> None:
    # pinned (2 GiB) fits on t1 or t2 only by evicting; t1 (ranked first) holds a copy that
    # reloads in 9 s, t2 one that reloads in 1 s: the copy on t2 goes.
    def tight(node_id: str, name: str, load_s: float) -> NodeView:
        base = node(node_id, memory=int(2.5 * GiB), labels={"pin": "yes"})
        status = mesh_pb2.CopyStatus(
            model=name, variant="default", state=R, sha256="a" * 64, load_seconds=load_s
        )
        return NodeView(node_id, base.labels, base.hardware, "", base.replicas, {key(name): status})

    pinned = spec("pinned", size=2 * GiB)
    pinned.node_selector["pin"] = "yes"
    snapshot = mesh(
        [spec("dear", copies=2, size=GiB), spec("cheap", copies=2, size=GiB), pinned],
        [tight("t1", "dear", 9.0), tight("t2", "cheap", 1.0), node("roomy", memory=8 * GiB)],
        {"dear": ["t1", "roomy"], "cheap": ["t2", "roomy"]},
    )
    plan = plan_placements(snapshot)
    assert [(e.key[0], e.node_id) for e in plan.evictions] == [("cheap", "t2")]
    assert list(plan.upserts[key("pinned")].nodes) == ["t2"]


# -- draining the last serving node ------------------------------------------------------------


def test_draining_the_last_serving_node_says_it_still_serves_until_a_replacement() -> None:
    from meshserve.controlplane.placement.leader import _still_serving
    from meshserve.controlplane.placement.scheduler import explain_variant

    base = mesh([spec("m")], [host("a", 600, m=(R, 100, 0))], {"m": ["a"]})
    snapshot = Snapshot(
        models=base.models, placements=base.placements, nodes=base.nodes, draining=frozenset("a")
    )
    placement = plan_placements(snapshot).upserts[key("m")]
    assert list(placement.nodes) == [], "nowhere else to go"
    assert _still_serving(snapshot, key("m"), placement) == ["a"]
    after = Snapshot(
        models=snapshot.models,
        placements={key("m"): placement},
        nodes=snapshot.nodes,
        draining=snapshot.draining,
    )
    *_, verdicts = explain_variant(after, key("m"))
    [a] = verdicts
    assert a.filtered_by == "not_draining" and "still serves its copy" in a.reason
    elsewhere = mesh_pb2.Placement(model="m", variant="default", nodes=["b"], desired_copies=1)
    assert _still_serving(base, key("m"), elsewhere) == [], "a node not draining is not named"
    replaced = Snapshot(
        models=base.models,
        placements=base.placements,
        nodes={**base.nodes, "b": host("b", 600, m=(R, 100, 0))},
        draining=frozenset("a"),
    )
    assert _still_serving(replaced, key("m"), elsewhere) == [], "b's copy is READY: a unloads"


# -- min_copies 0 ------------------------------------------------------------------------------


def test_a_variant_that_may_scale_to_zero_starts_at_zero_not_one_copy() -> None:
    from meshserve.controlplane.placement.autoscale import Autoscaler

    lazy = spec("lazy")
    lazy.autoscaling.CopyFrom(mesh_pb2.Autoscaling(min_copies=0, max_copies=2))
    eager = spec("eager")
    eager.autoscaling.CopyFrom(mesh_pb2.Autoscaling(min_copies=1, max_copies=2))
    snapshot = mesh([lazy, eager], [host("a", 600)])
    desired, _ = Autoscaler(lambda: 0.0).decide(snapshot)
    assert desired == {key("lazy"): 0, key("eager"): 1}
    plan = plan_placements(snapshot, desired=desired)
    assert list(plan.upserts[key("lazy")].nodes) == [] and plan.evictions == []
    woken = Snapshot(models=snapshot.models, nodes=snapshot.nodes, wake=frozenset({key("lazy")}))
    assert Autoscaler(lambda: 0.0).decide(woken)[0][key("lazy")] == 1, "a waiting query wakes it"
