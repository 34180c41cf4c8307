"""Prometheus endpoints on a control plane and a node (OpenTelemetry metrics), with real
processes: the text parses with prometheus_client's parser, the request counters match the
queries sent, and the node exports its batching, cache and copy metrics, the control plane its
placement decisions."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.devtools.local import LocalMesh, free_port, wait_until
from meshserve.protos import mesh_pb2
from tests.support.mesh import wait_copies

QUERIES = 25
BATCHED_CACHED = mesh_pb2.ServingConfig(
    batching=mesh_pb2.BatchingConfig(enabled=True, max_batch_size=8), cache=True
)


def _samples(port: int) -> list[Sample]:
    """Every sample http://127.0.0.1:<port>/metrics exports."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _by_hop(port: int) -> dict[str, float]:
    """Sum of ``meshserve_requests`` samples by hop."""
    totals: dict[str, float] = {}
    for sample in _samples(port):
        if sample.name == "meshserve_requests_total":
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
            admin.register_model("mlp", model.as_uri(), sha256_file(model), serving=BATCHED_CACHED)
            wait_copies(admin, "mlp", 1)
        x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
        with MeshClient(cp.address, timeout=10) as client:
            for _ in range(QUERIES):
                client.infer("mlp", {"x": x})  # the same query: one miss, then cache hits
        wait_until(lambda: _by_hop(cp_port).get("gateway") == QUERIES, 10, what="gateway count")
        wait_until(lambda: _by_hop(node_port).get("node") == QUERIES, 10, what="node count")
        cp_samples, node_samples = _samples(cp_port), _samples(node_port)

    latency = "rpc_server_duration_milliseconds_count"
    assert _total(cp_samples, latency, hop="gateway", node="n1", variant="default") == QUERIES
    assert _total(node_samples, latency, hop="node", node="n1", model="mlp") == QUERIES
    assert _total(cp_samples, "meshserve_placement_decisions_total", action="place") >= 1
    assert _total(cp_samples, "meshserve_scheduler_duration_seconds_count") >= 1

    copy = {"model": "mlp", "variant": "default"}
    assert _total(node_samples, "meshserve_cache_misses_total", **copy) == 1
    assert _total(node_samples, "meshserve_cache_hits_total", **copy) == QUERIES - 1
    assert _total(node_samples, "meshserve_batch_size_count", **copy) == 1, "the miss ran"
    assert _total(node_samples, "meshserve_batch_size_sum", **copy) == 1
    assert _total(node_samples, "meshserve_queue_duration_milliseconds_count", **copy) == 1
    assert _total(node_samples, "meshserve_copy_load_duration_seconds_count", **copy) == 1
    assert _total(node_samples, "meshserve_copy_warmup_duration_seconds_count", **copy) == 1
    memory = [s for s in node_samples if s.name == "meshserve_copy_memory_bytes"]
    assert [(s.labels["model"], s.labels["variant"]) for s in memory] == [("mlp", "default")]


def _listeners(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) listening on ``port``."""
    out: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                out.add(address)
    return out


def test_metrics_listen_with_a_port_only_binds_loopback(tmp_path: Path) -> None:
    """``--metrics-listen :PORT`` serves /metrics on 127.0.0.1 only, not on every interface."""
    port = free_port()
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        mesh.start_controlplane("cp-1", extra=["--metrics-listen", f":{port}"])
        wait_until(lambda: _samples(port), 10, what="/metrics on 127.0.0.1")
        assert _listeners(port) == {"0100007F"}, _listeners(port)  # 127.0.0.1, nothing else
