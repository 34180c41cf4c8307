"""What ``meshctl nodes list`` / ``placements list`` say about state (client/cli/_placement_view.py)
and the node state the Admin API answers with (pure: hand-built answers and snapshots)."""

from __future__ import annotations

from meshserve.client.cli._placement_view import node_state, ready_copies, replication
from meshserve.controlplane.observe.telemetry import node_list as _node_list
from meshserve.controlplane.snapshot import Snapshot
from meshserve.protos import mesh_pb2
from tests.support.views import node


def info(node_id: str, *, draining: bool = False, **copies: int) -> mesh_pb2.NodeInfo:
    return mesh_pb2.NodeInfo(
        node_id=node_id,
        draining=draining,
        copies=[
            mesh_pb2.CopyStatus(model=m, variant="default", state=state)  # type: ignore[arg-type]
            for m, state in copies.items()
        ],
    )


def placement(nodes: list[str], desired: int) -> mesh_pb2.Placement:
    return mesh_pb2.Placement(model="m", variant="default", nodes=nodes, desired_copies=desired)


NODES = [
    info("a", m=mesh_pb2.READY),
    info("b", m=mesh_pb2.LOADING),
    info("c", draining=True, m=mesh_pb2.READY),
    info("d"),
]


def test_a_placement_with_fewer_ready_copies_than_desired_is_flagged() -> None:
    r = replication(placement(["a", "b"], 3), ready_copies(NODES))
    assert (r.ready, r.desired, r.under) == (1, 3, True)
    assert r.cell() == "1/3 under-replicated"
    full = replication(placement(["a"], 1), ready_copies(NODES[:2]))
    assert (full.cell(), full.note()) == ("1/1", "")


def test_a_drained_node_still_serving_a_copy_no_placement_names_is_said() -> None:
    r = replication(placement([], 1), ready_copies(NODES[2:]))
    assert r.cell() == "0/1 under-replicated"
    assert r.note() == "still served by c (draining) until a copy is READY elsewhere"


def test_nodes_list_says_which_node_is_draining() -> None:
    assert [node_state(n) for n in NODES] == ["serving", "serving", "draining", "serving"]
    snapshot = Snapshot(nodes={"x": node("x"), "y": node("y")}, draining=frozenset({"y"}))
    answer = _node_list(snapshot, {})
    assert [(n.node_id, n.draining) for n in answer.nodes] == [("x", False), ("y", True)]
