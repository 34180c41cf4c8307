"""Location-aware routing with real processes: a query naming its zone is answered by a copy in
that zone while one is ready, by a copy elsewhere when none is; a zone-labelled gateway prefers
its own zone for queries that name none."""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from pathlib import Path

import numpy as np

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, wait_until
from tests.support.mesh import register_file, wait_copies

X = np.random.default_rng(7).standard_normal((1, 64)).astype(np.float32)


def _answers(
    client: MeshClient, count: int, expected: np.ndarray, zone: str | None
) -> Counter[str]:
    answered: Counter[str] = Counter()
    for _ in range(count):  # bounded: sequential queries
        result = client.infer("mlp", {"x": X}, zone=zone)
        np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
        answered[result.node] += 1
    return answered


def test_queries_go_to_their_zone_and_leave_it_only_when_it_has_no_copy(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        cp_b = mesh.start_controlplane("cp-2", extra=["--zone", "b"])
        replicas = [cp.address, cp_b.address]
        node_a = mesh.start_node("node-a", replicas, labels={"zone": "a", "tier": "edge"})
        mesh.start_node("node-b", replicas, labels={"zone": "b", "tier": "edge"})
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", model, copies=2)
            wait_copies(admin, "mlp", 2)
            wait_until(  # both nodes hold a stream to both replicas (each can tunnel to both)
                lambda: (
                    len(nodes := admin.list_nodes()) == 2
                    and all(set(n.replicas) == {"cp-1", "cp-2"} for n in nodes)
                ),
                30,
                what="both nodes linked to both replicas",
            )
        expected = reference_outputs(model, {"x": X})["y"]
        with MeshClient(cp.address, timeout=10) as client:
            assert _answers(client, 30, expected, "a") == {"node-a": 30}
            assert _answers(client, 30, expected, "b") == {"node-b": 30}
            # No zone: power of two choices on load. Sequential queries would all go to whichever
            # copy answered faster (by design); concurrent ones spread by in-flight count.
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                parts = pool.map(lambda _: _answers(client, 5, expected, None), range(8))
                anywhere = sum(parts, Counter[str]())
            assert anywhere["node-a"] >= 1 and anywhere["node-b"] >= 1, dict(anywhere)
            nowhere = _answers(client, 10, expected, "nowhere")  # no such zone: any copy
            assert set(nowhere) <= {"node-a", "node-b"}, dict(nowhere)
        with MeshClient(cp_b.address, timeout=10) as client:
            assert _answers(client, 20, expected, None) == {"node-b": 20}  # the gateway's zone
            assert _answers(client, 20, expected, "a") == {"node-a": 20}  # the query's wins
        node_a.kill()  # zone a has no copy left; its queries are answered in zone b
        with MeshClient(cp.address, timeout=10) as client:
            assert _answers(client, 20, expected, "a") == {"node-b": 20}
