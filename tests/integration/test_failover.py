"""Crash tests with real processes: a node and the scheduling leader are killed with SIGKILL.

Real etcd, real control-plane replicas and node processes on loopback; lease TTL 3 s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path

import numpy as np

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.controlplane import keys
from meshserve.controlplane.etcd import connect
from meshserve.devtools.demo_models import make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, wait_until
from tests.support.mesh import register_file, wait_copies

TTL = 3


def _etcd_get(url: str, key: str) -> tuple[bytes, int] | None:
    """(value, lease id) of ``key`` read straight from etcd, or None."""

    async def read() -> tuple[bytes, int] | None:
        client = await connect(url)
        try:
            kv = await client.get(key.encode())
            return None if kv is None else (kv.value, kv.lease)
        finally:
            await client.close()

    return asyncio.run(read())


def _answers(target: str, model: Path, count: int, concurrency: int = 4) -> list[str]:
    """Which node answered each of ``count`` queries, sent ``concurrency`` at a time (the
    gateway balances on load: sequential queries would all go to the faster copy)."""
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    expected = reference_outputs(model, {"x": x})["y"]

    def one(client: MeshClient) -> str:
        result = client.infer("mlp", {"x": x})
        np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
        return result.node

    with MeshClient(target, timeout=10) as client:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda _: one(client), range(count)))


def test_killed_node_disappears_within_lease_ttl_and_other_copy_answers(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=TTL) as mesh:
        url = mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        victim = mesh.start_node("node-a", [cp.address])
        mesh.start_node("node-b", [cp.address])
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", model, copies=2)
            wait_copies(admin, "mlp", 2)
        record = _etcd_get(url, keys.node_link_key("node-a", "cp-1"))
        assert record is not None, "node-a's record is not in etcd"
        assert record[1] != 0, "node-a's record is not attached to a lease"
        assert set(_answers(cp.address, model, 20)) == {"node-a", "node-b"}

        victim.kill()
        killed = time.monotonic()
        wait_until(
            lambda: _etcd_get(url, keys.node_link_key("node-a", "cp-1")) is None,
            TTL + 1,
            what="node-a's record to leave etcd",
        )
        gone_after = time.monotonic() - killed
        assert gone_after <= TTL
        assert set(_answers(cp.address, model, 10)) == {"node-b"}


def test_leader_killed_second_replica_takes_over(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=TTL) as mesh:
        url = mesh.start_etcd()
        cp1 = mesh.start_controlplane("cp-1")
        wait_until(lambda: _etcd_get(url, keys.LEADER), 10, what="a leader")
        cp2 = mesh.start_controlplane("cp-2")
        both = [cp1.address, cp2.address]
        mesh.start_node("node-a", both)
        mesh.start_node("node-b", both)
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp2.address) as admin:
            register_file(admin, "mlp", model, copies=1)
            wait_copies(admin, "mlp", 1)
        leader = _etcd_get(url, keys.LEADER)
        assert leader is not None and leader[0] == b"cp-1"

        cp1.kill()
        wait_until(
            lambda: (v := _etcd_get(url, keys.LEADER)) and v[0] == b"cp-2",
            TTL + 5,
            what="cp-2 to become leader",
        )
        # Nodes are (still or again) linked to the surviving replica; cp-1's links expired.
        wait_until(
            lambda: all(
                _etcd_get(url, keys.node_link_key(n, "cp-2"))
                and _etcd_get(url, keys.node_link_key(n, "cp-1")) is None
                for n in ("node-a", "node-b")
            ),
            TTL + 5,
            what="nodes linked to cp-2 only",
        )
        # The new leader schedules: a model registered now gets placed, loaded and served.
        with AdminClient(cp2.address) as admin:
            register_file(admin, "mlp2", model, copies=2)
            wait_copies(admin, "mlp2", 2)
            placements = {p.model: list(p.nodes) for p in admin.list_placements()}
        assert sorted(placements["mlp2"]) == ["node-a", "node-b"]
        assert _answers(cp2.address, model, 5)
