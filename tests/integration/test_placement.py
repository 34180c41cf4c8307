"""Placement decisions with real processes: memory-aware spreading, a joining node, eviction,
draining, copies that follow demand, and policies applied at run time on every replica.

Real etcd, real control-plane and node processes on loopback, real onnxruntime. Declared model
sizes (``size_bytes``) stand in for big models; nodes offer a bounded memory (``--memory-mb``).
Every load loop is bounded in count and time.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.common.errors import InvalidArgument
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.devtools.local import LocalMesh, wait_until
from meshserve.protos import mesh_pb2
from tests.support.mesh import wait_copies

MiB = 1 << 20
X = np.random.default_rng(9).standard_normal((1, 64)).astype(np.float32)


def _register(
    admin: AdminClient, name: str, model: Path, *, size_mb: int = 0, **kw: object
) -> None:
    admin.register_model(
        name,
        model.as_uri(),
        sha256_file(model),
        size_bytes=size_mb * MiB,
        **kw,  # type: ignore[arg-type]
    )


def _placement(admin: AdminClient, name: str) -> list[str]:
    for p in admin.list_placements(name):
        return sorted(p.nodes)
    return []


def test_models_are_spread_by_memory_and_a_joining_node_gets_copies(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        for name, mb in (("small-a", 400), ("small-b", 400), ("big", 800)):
            mesh.start_node(name, [cp.address], extra=["--memory-mb", str(mb)])
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            wait_until(lambda: len(admin.list_nodes()) == 3, 20, what="3 nodes")
            names = [f"m{i}" for i in range(4)]  # 4 x 300 MiB: more than any one node holds
            for name in names:
                _register(admin, name, model, size_mb=300)
            for name in names:
                wait_copies(admin, name, 1)
            where = {name: _placement(admin, name) for name in names}
            per_node: dict[str, int] = {}
            for nodes in where.values():
                assert len(nodes) == 1
                per_node[nodes[0]] = per_node.get(nodes[0], 0) + 300
            assert per_node == {"small-a": 300, "small-b": 300, "big": 600}, where
            # Full: a fifth model cannot be placed ... until a node joins.
            _register(admin, "late", model, size_mb=300)
            time.sleep(1.5)
            assert _placement(admin, "late") == []
            explained = admin.explain_placement("late")[0]
            assert {n.filtered_by for n in explained.nodes} == {"fits_memory"}
            mesh.start_node("joiner", [cp.address], extra=["--memory-mb", "400"])
            wait_copies(admin, "late", 1)
            assert _placement(admin, "late") == ["joiner"]
            kinds = {e.kind for e in admin.list_events(200)}
            assert "placement" in kinds


def test_a_tight_node_evicts_the_cheapest_copy_and_the_model_stays_served(
    tmp_path: Path,
) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("tight", [cp.address], labels={"pin": "yes"}, extra=["--memory-mb", "400"])
        mesh.start_node("roomy", [cp.address], extra=["--memory-mb", "800"])
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            wait_until(lambda: len(admin.list_nodes()) == 2, 20, what="2 nodes")
            _register(admin, "spare", model, size_mb=300, copies=2)
            wait_copies(admin, "spare", 2)
            _register(admin, "pinned", model, size_mb=300, node_selector={"pin": "yes"})
            wait_copies(admin, "pinned", 1)
            assert _placement(admin, "pinned") == ["tight"]
            assert _placement(admin, "spare") == ["roomy"]
            evictions = admin.list_events(100, kind="evict")
            assert [(e.model, e.node_id) for e in evictions] == [("spare", "tight")]
        with MeshClient(cp.address, timeout=10) as client:
            answered = {client.infer("spare", {"x": X}).node for _ in range(10)}
        assert answered == {"roomy"}


def test_a_draining_node_gets_no_new_queries_and_loses_none_in_flight(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        for name in ("a", "b"):
            mesh.start_node(name, [cp.address], extra=["--fault-delay-ms", "30"])
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            _register(admin, "mlp", model, copies=2)
            wait_copies(admin, "mlp", 2)
            answers: list[tuple[float, str]] = []
            lock = threading.Lock()
            stop_at = time.monotonic() + 6.0

            def worker(client: MeshClient) -> None:
                for _ in range(300):  # bounded in count and time
                    if time.monotonic() > stop_at:
                        return
                    node = client.infer("mlp", {"x": X}).node
                    with lock:
                        answers.append((time.monotonic(), node))

            with MeshClient(cp.address, timeout=10) as client:
                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    futures = [pool.submit(worker, client) for _ in range(4)]
                    time.sleep(1.5)
                    assert admin.drain_node("a") is True
                    drained_at = time.monotonic()
                    for f in futures:
                        f.result(timeout=30)  # no query failed
            before = [n for t, n in answers if t < drained_at]
            late = [n for t, n in answers if t > drained_at + 1.0]
            assert "a" in before, "node a served before the drain"
            assert late and "a" not in late, "node a got new queries after the drain settled"
            assert _placement(admin, "mlp") == ["b"]
            assert any(e.kind == "drain" and e.node_id == "a" for e in admin.list_events())
            assert admin.drain_node("a", undrain=True) is False
            wait_copies(admin, "mlp", 2)


def test_copies_follow_demand_up_and_back_down(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--telemetry-interval-ms", "300"])
        for name in ("n1", "n2", "n3"):
            mesh.start_node(name, [cp.address], extra=["--fault-delay-ms", "80"])
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            _register(
                admin,
                "mlp",
                model,
                autoscaling=mesh_pb2.Autoscaling(
                    min_copies=1, max_copies=3, target_in_flight=1.5, scale_down_delay_s=2
                ),
            )
            wait_copies(admin, "mlp", 1)
            assert len(_placement(admin, "mlp")) == 1
            stop = threading.Event()

            def worker(client: MeshClient) -> None:
                deadline = time.monotonic() + 25
                for _ in range(2000):  # bounded in count and time
                    if stop.is_set() or time.monotonic() > deadline:
                        return
                    client.infer("mlp", {"x": X})

            with MeshClient(cp.address, timeout=10) as client:
                with concurrent.futures.ThreadPoolExecutor(6) as pool:
                    futures = [pool.submit(worker, client) for _ in range(6)]
                    try:
                        wait_until(lambda: len(_placement(admin, "mlp")) == 3, 20, what="3 copies")
                        wait_copies(admin, "mlp", 3)
                    finally:
                        stop.set()
                        for f in futures:
                            f.result(timeout=30)
            wait_until(lambda: len(_placement(admin, "mlp")) == 1, 20, what="back to 1 copy")
            scale = admin.list_events(100, kind="scale")
            assert any("-> 3" in e.message for e in scale) and any(
                "-> 1" in e.message for e in scale
            )


def test_policies_are_validated_and_hot_reloaded_by_every_replica(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp1 = mesh.start_controlplane("cp-1")
        time.sleep(0.5)  # cp-1 campaigns first: the leader; cp-2 is the one we talk to
        cp2 = mesh.start_controlplane("cp-2")
        both = [cp1.address, cp2.address]
        mesh.start_node("edge-1", both, labels={"tier": "edge"})
        mesh.start_node("core-1", both, labels={"tier": "core"})
        model = make_mlp(tmp_path / "mlp.onnx")
        bad = "name: broken\ndefault:\n  scores:\n    least_loaded: 1\n    bogus: 2\n"
        with AdminClient(cp2.address) as admin:
            wait_until(lambda: len(admin.list_nodes()) == 2, 20, what="2 nodes")
            with pytest.raises(InvalidArgument, match=r"line 5.*bogus"):
                admin.apply_policy(bad)
            assert admin.get_policy().yaml == ""
            for prefer, name in (("core", "to-core"), ("edge", "to-edge")):
                text = (
                    f"name: prefer-{prefer}\n"
                    "default:\n"
                    "  scores: {affinity: 10, least_loaded: 1}\n"
                    f"  prefer_labels: {{tier: {prefer}}}\n"
                )
                admin.apply_policy(text)  # through the replica that is NOT the leader
                _register(admin, name, model)
                wait_copies(admin, name, 1)
                assert _placement(admin, name) == [f"{prefer}-1"]
                for target in both:  # every replica has it in force, no restart
                    with AdminClient(target) as each:
                        assert each.get_policy().yaml == text
                        wait_until(
                            lambda each=each, name=name: _rule(each, name),
                            10,
                            what=f"an explanation from {target}",
                        )
                        assert _rule(each, name) == f"prefer-{prefer}: default"
            assert [e.kind for e in admin.list_events(10, kind="policy")] == ["policy", "policy"]


def _rule(admin: AdminClient, model: str) -> str:
    try:
        return admin.explain_placement(model)[0].policy
    except Exception:
        return ""


def test_scale_to_zero_and_the_first_query_waits_for_a_warm_copy(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--telemetry-interval-ms", "300"])
        mesh.start_node("n1", [cp.address])
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            # min_copies 0: the variant starts at zero copies; the first query wakes one on n1.
            wait_until(lambda: len(admin.list_nodes()) == 1, 20, what="n1 linked")
            _register(
                admin,
                "lazy",
                model,
                autoscaling=mesh_pb2.Autoscaling(
                    min_copies=0, max_copies=1, target_in_flight=1, scale_down_delay_s=1
                ),
            )
            time.sleep(1.5)  # a few leader passes: min_copies 0 loads nothing before a query
            assert _placement(admin, "lazy") == []
            assert not any(c.model == "lazy" for n in admin.list_nodes() for c in n.copies)
            wait_until(lambda: _placement(admin, "lazy") == [], 20, what="scale to zero")
            wait_until(
                lambda: not any(c.model == "lazy" for n in admin.list_nodes() for c in n.copies),
                20,
                what="the idle copy to unload",
            )
            with MeshClient(cp.address, timeout=30) as client:
                started = time.monotonic()
                result = client.infer("lazy", {"x": X})
                waited = time.monotonic() - started
            assert result.node == "n1" and result["y"].shape == (1, 10)
            cold = [e for e in admin.list_events(50, kind="scale") if "cold start" in e.message]
            assert cold, "the cold start is recorded with its wait"
            assert waited < 20, f"the cold start waited {waited:.1f} s (client deadline 30 s)"
            wait_until(lambda: _placement(admin, "lazy") == [], 20, what="back to zero")
