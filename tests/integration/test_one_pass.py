"""Placement decisions inside one pass, with real processes (issue 14 §7): three nodes of
300 / 300 / 600 MiB (``--memory-mb``) in zones a / a / b.

Real etcd, a real control plane and real nodes on loopback. Declared sizes (``size_bytes``)
stand in for big models. Every wait is bounded.
"""

from __future__ import annotations

from pathlib import Path

from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.devtools.local import LocalMesh, wait_until
from meshserve.protos import mesh_pb2
from tests.support.mesh import wait_copies

MiB = 1 << 20
NODES = {"a-1": ("a", 300), "a-2": ("a", 300), "b-1": ("b", 600)}


def _placement(admin: AdminClient, name: str) -> list[str]:
    for p in admin.list_placements(name):
        return sorted(p.nodes)
    return []


def test_copies_of_one_pass_spread_memory_counts_and_a_drained_node_is_said_to_serve(
    tmp_path: Path,
) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        for name, (zone, mb) in NODES.items():
            mesh.start_node(
                name, [cp.address], labels={"zone": zone}, extra=["--memory-mb", str(mb)]
            )
        model = make_mlp(tmp_path / "mlp.onnx")
        sha = sha256_file(model)
        with AdminClient(cp.address) as admin:
            wait_until(lambda: len(admin.list_nodes()) == 3, 20, what="3 nodes")
            # Both copies go out in one pass: the second sees the first and takes zone b.
            admin.register_model("m", model.as_uri(), sha, copies=2, size_bytes=150 * MiB)
            wait_copies(admin, "m", 2)
            where = _placement(admin, "m")
            assert {NODES[n][0] for n in where} == {"a", "b"}, where
            # 200 MiB does not fit beside m's 150 MiB on a 300 MiB node.
            admin.register_model("big", model.as_uri(), sha, size_bytes=200 * MiB)
            wait_copies(admin, "big", 1)
            [big_on] = _placement(admin, "big")
            used = {n: 0 for n in NODES}
            for name, size in (("m", 150), ("big", 200)):
                for n in _placement(admin, name):
                    used[n] += size
            assert all(used[n] <= NODES[n][1] for n in NODES), (used, big_on)
            # solo (250 MiB) fits only on b-1. Drain b-1: no other node has room, so solo's
            # placement leaves b-1 while b-1 keeps serving its only copy; nodes list, the
            # placement event and explain say so (m's copy there goes: a-1 serves m).
            admin.register_model("solo", model.as_uri(), sha, size_bytes=250 * MiB)
            wait_copies(admin, "solo", 1)
            assert _placement(admin, "solo") == ["b-1"]
            admin.drain_node("b-1")
            wait_until(lambda: _placement(admin, "solo") == [], 20, what="solo's placement empty")
            states = {n.node_id: n.draining for n in admin.list_nodes()}
            assert states == {"a-1": False, "a-2": False, "b-1": True}
            wait_until(lambda: "b-1" not in _placement(admin, "m"), 20, what="m off b-1")
            wait_until(
                lambda: not any(c.model == "m" for c in _node(admin, "b-1").copies),
                20,
                what="m unloaded from b-1 (a-1 serves it)",
            )
            solo = [c for c in _node(admin, "b-1").copies if c.model == "solo"]
            assert [c.state for c in solo] == [mesh_pb2.READY], "the only copy keeps serving"
            events = [e.message for e in admin.list_events(100, kind="placement", model="solo")]
            assert any("still served by draining ['b-1']" in m for m in events), events
            [explained] = admin.explain_placement("solo")
            b1 = next(n for n in explained.nodes if n.node_id == "b-1")
            assert b1.filtered_by == "not_draining" and "still serves its copy" in b1.reason


def _node(admin: AdminClient, node_id: str) -> mesh_pb2.NodeInfo:
    return next(n for n in admin.list_nodes() if n.node_id == node_id)
