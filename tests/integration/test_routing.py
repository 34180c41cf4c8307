"""Routing in the gateway with real processes: power of two choices on observed latency, and
the one retry on another copy when a copy dies mid-traffic."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, wait_until
from tests.support.mesh import register_file, wait_copies

X = np.random.default_rng(5).standard_normal((1, 64)).astype(np.float32)


def test_most_queries_go_to_the_fast_copy(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("fast", [cp.address])
        mesh.start_node("slow", [cp.address], extra=["--fault-delay-ms", "40"])
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", model, copies=2)
            wait_copies(admin, "mlp", 2)
        expected = reference_outputs(model, {"x": X})["y"]
        answered: Counter[str] = Counter()
        with MeshClient(cp.address, timeout=10) as client:
            for _ in range(60):  # bounded: 60 sequential queries
                result = client.infer("mlp", {"x": X})
                np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
                answered[result.node] += 1
        assert answered["fast"] >= 48, f"queries per node: {dict(answered)}"
        assert answered["slow"] >= 1, "the slow copy is still probed now and then"


def test_queries_in_flight_on_a_killed_copy_succeed_through_the_retry(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        victim = mesh.start_node("victim", [cp.address], extra=["--fault-delay-ms", "20"])
        mesh.start_node("survivor", [cp.address], extra=["--fault-delay-ms", "20"])
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", model, copies=2)
            wait_copies(admin, "mlp", 2)
        expected = reference_outputs(model, {"x": X})["y"]
        done = Counter[str]()
        lock = threading.Lock()

        def worker(client: MeshClient, count: int) -> None:
            for _ in range(count):
                result = client.infer("mlp", {"x": X})
                np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
                with lock:
                    done[result.node] += 1

        with MeshClient(cp.address, timeout=10) as client:
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(worker, client, 40) for _ in range(6)]
                deadline = time.monotonic() + 20
                while sum(done.values()) < 40 and time.monotonic() < deadline:
                    time.sleep(0.01)
                with lock:
                    before = done["victim"]
                assert before > 0, "the victim answered nothing before it was killed"
                victim.kill()  # queries are in flight on it right now
                for f in futures:
                    f.result(timeout=60)  # every query succeeded (an error would raise here)
        assert sum(done.values()) == 240
        assert done["survivor"] > 0
        with AdminClient(cp.address) as admin:
            reroutes = wait_until(
                lambda: admin.list_events(50, kind="reroute"), 10, what="reroute events"
            )
        assert all(e.node_id == "victim" for e in reroutes)
