"""Prometheus endpoints on a control plane and a node (OpenTelemetry metrics), with real
processes: the text parses with prometheus_client's parser and the request counters match the
queries sent."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from client import MeshClient
from client._admin import AdminClient
from client.demo_models import make_mlp
from client.local import LocalMesh, free_port, wait_until
from tests.support.mesh import register_file, wait_copies

QUERIES = 25


def _scrape(port: int) -> dict[str, float]:
    """Sum of ``meshserve_requests`` samples by hop, from http://127.0.0.1:<port>/metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("meshserve_requests") and sample.name.endswith("_total"):
                hop = sample.labels.get("hop", "")
                totals[hop] = totals.get(hop, 0.0) + sample.value
    return totals


def test_request_counters_match_the_queries_sent(tmp_path: Path) -> None:
    cp_port, node_port = free_port(), free_port()
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--metrics-listen", f"127.0.0.1:{cp_port}"])
        mesh.start_node("n1", [cp.address], extra=["--metrics-listen", f"127.0.0.1:{node_port}"])
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", model)
            wait_copies(admin, "mlp", 1)
        x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
        with MeshClient(cp.address, timeout=10) as client:
            for _ in range(QUERIES):
                client.infer("mlp", {"x": x})
        wait_until(lambda: _scrape(cp_port).get("gateway") == QUERIES, 10, what="gateway count")
        wait_until(lambda: _scrape(node_port).get("node") == QUERIES, 10, what="node count")
        text = urllib.request.urlopen(f"http://127.0.0.1:{cp_port}/metrics", timeout=5).read()
        assert b"rpc_server_duration" in text, "the latency histogram is exported"
