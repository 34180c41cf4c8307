"""Replicas that come and go after the nodes joined (issue 14 §2), and the gateway's keepalive to
nodes' direct ports against the node server's ping policy (§8).

Real etcd, real control-plane replicas and node processes on loopback, real onnxruntime.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.client._routed import Routing
from meshserve.devtools.demo_models import make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, ManagedProcess, free_port, wait_until
from meshserve.errors import Unavailable
from tests.support.mesh import register_file, wait_copies

TTL = 3


def _linked_to(admin: AdminClient, node_id: str) -> set[str]:
    """The replicas ``node_id`` holds a stream to, as the control plane records them."""
    return {r for n in admin.list_nodes() if n.node_id == node_id for r in n.replicas}


def _query(target: str, model: Path, routing: Routing = "direct") -> str:
    """One query through ``target`` (checked against onnxruntime); the node that answered."""
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    with MeshClient(target, timeout=5, routing=routing) as client:
        result = client.infer("mlp", {"x": x})
    np.testing.assert_allclose(result["y"], reference_outputs(model, {"x": x})["y"], rtol=1e-5)
    return result.node


def _log(proc: ManagedProcess) -> str:
    return proc.log_path.read_text(errors="replace")


def test_a_replica_started_after_the_node_reaches_it_and_a_stopped_one_is_dropped(
    tmp_path: Path,
) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=TTL) as mesh:
        mesh.start_etcd()
        cp1 = mesh.start_controlplane("cp-1")
        node = mesh.start_node("edge-1", [cp1.address])  # tunnel-only: no direct port
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp1.address) as admin:
            register_file(admin, "mlp", model, copies=1)
            wait_copies(admin, "mlp", 1)
        assert _query(cp1.address, model) == "edge-1"

        cp2 = mesh.start_controlplane("cp-2")  # the node was told only of cp-1 when it joined
        with AdminClient(cp2.address) as admin2:
            wait_until(
                lambda: _linked_to(admin2, "edge-1") == {"cp-1", "cp-2"},
                5,
                what="edge-1 linked to both replicas",
            )
        assert _query(cp2.address, model) == "edge-1"
        assert _query(cp1.address, model) == "edge-1"

        cp2.stop()  # SIGTERM: its record leaves etcd, cp-1 tells the node
        with AdminClient(cp1.address) as admin:
            wait_until(
                lambda: _linked_to(admin, "edge-1") == {"cp-1"},
                TTL + 2,
                what="edge-1 linked to cp-1 only",
            )
        wait_until(
            lambda: f"replica cp-2 at {cp2.address} left the mesh" in _log(node),
            TTL + 2,
            what="edge-1 to drop its link to cp-2",
        )
        # Dropped means no more dialling: the log stays free of new attempts at cp-2's address.
        attempts = _log(node).count(f"stream to {cp2.address} failed")
        time.sleep(2.0)
        assert _log(node).count(f"stream to {cp2.address} failed") == attempts
        assert _query(cp1.address, model) == "edge-1"


def test_a_replica_the_node_cannot_dial_says_not_reachable_not_not_ready(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=TTL) as mesh:
        mesh.start_etcd()
        cp1 = mesh.start_controlplane("cp-1")
        mesh.start_node("edge-1", [cp1.address])  # tunnel-only
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp1.address) as admin:
            register_file(admin, "mlp", model, copies=1)
            wait_copies(admin, "mlp", 1)
        # cp-2 advertises an address nobody listens on: the node is told of it but never links.
        cp2 = mesh.start_controlplane("cp-2", extra=["--advertise", f"127.0.0.1:{free_port()}"])
        x = np.zeros((2, 64), dtype=np.float32)
        with MeshClient(cp2.address, timeout=3) as client, pytest.raises(Unavailable) as caught:
            client.infer("mlp", {"x": x})
        assert "is ready on edge-1, not reachable from this replica" in caught.value.message
        assert "not ready yet" not in caught.value.message
        assert _query(cp1.address, model) == "edge-1"


def test_the_gateways_keepalive_to_a_direct_port_is_not_refused_as_too_many_pings(
    tmp_path: Path,
) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=TTL) as mesh:
        mesh.start_etcd()
        # Pings every 0.5 s: the node's default policy (one ping per 5 min without data) sent
        # GOAWAY ENHANCE_YOUR_CALM "too_many_pings" after the third.
        cp = mesh.start_controlplane("cp-1", extra=["--keepalive-ms", "500"])
        mesh.start_node("core-1", [cp.address], direct=True)
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", model, copies=1)
            wait_copies(admin, "mlp", 1)
        # through the gateway (the SDK would go to the port itself): opens its channel there
        assert _query(cp.address, model, "gateway") == "core-1"
        time.sleep(4.0)  # eight keepalive intervals on an idle channel
        assert _query(cp.address, model, "gateway") == "core-1"
        assert "too_many_pings" not in _log(cp)
