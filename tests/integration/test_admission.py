"""A reconnect storm: many nodes dial at once; the control plane admits new streams at a bounded
rate, the rest retry with jittered backoff, and every node joins."""

from __future__ import annotations

from pathlib import Path

from meshserve.client._admin import AdminClient
from meshserve.devtools.local import LocalMesh, wait_until


def test_a_storm_of_nodes_is_admitted_at_a_bounded_rate_and_all_join(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--admissions-per-s", "1"])
        nodes = [mesh.start_node(f"n{i}", [cp.address]) for i in range(5)]
        with AdminClient(cp.address) as admin:
            wait_until(lambda: len(admin.list_nodes()) == 5, 60, what="all 5 nodes to join")
        refused = sum("admits 1 new streams/s" in n.tail(200) for n in nodes)
        assert refused >= 1, "some nodes were told to come back later"
