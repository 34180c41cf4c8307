"""Hostile queries cost the servers a bounded amount, with real processes (etcd, a control plane
with its gateway, a node with its own port, real ONNX files).

- A thousand failed queries naming unique long models and versions, to the gateway and to the
  node's port, leave each process's resident memory and its request-metrics table bounded: the
  table records resolved names only (unknown -> ``(unknown)``), and holds a bounded number of rows.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from meshserve.client._admin import AdminClient
from meshserve.common.codec import build_request
from meshserve.devtools.demo_models import make_mlp
from meshserve.devtools.local import LocalMesh, free_port, wait_until
from meshserve.protos import inference_pb2, inference_pb2_grpc
from tests.support.mesh import register_file, wait_copies

HOSTILE = 1000  # queries per target
LABEL_BYTES = 64 << 10  # each model name and version: 64 KiB (a request stays ~130 KiB)
RSS_BOUND = 100 << 20  # growth allowed per process (the table alone grew ~128 MiB before)
ROWS_BOUND = 64  # label sets a metrics endpoint may show after the hostile queries
CONCURRENCY = 8


def _rss(pid: int) -> int:
    """The resident memory of process ``pid`` in bytes (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for {pid}")


def _request_rows(port: int) -> list[dict[str, str]]:
    """The label sets of ``meshserve_requests_total`` at http://127.0.0.1:<port>/metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return [
        dict(s.labels)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "meshserve_requests_total"
    ]


def _hostile(i: int, x: np.ndarray) -> inference_pb2.ModelInferRequest:
    """Query ``i``: an unknown model (even i) or the known ``mlp`` at an unknown version (odd
    i), each name unique and :data:`LABEL_BYTES` long."""
    tag = f"{i:06d}"
    long = (tag * (LABEL_BYTES // len(tag) + 1))[:LABEL_BYTES]
    model = f"m{long}"[:LABEL_BYTES] if i % 2 == 0 else "mlp"
    request = build_request(model, {"x": x})
    request.model_version = f"v{long}"[:LABEL_BYTES]
    return request


async def _send_hostile(target: str, x: np.ndarray) -> dict[grpc.StatusCode, int]:
    """Send :data:`HOSTILE` hostile queries to ``target``, :data:`CONCURRENCY` at a time;
    the status codes they got (each must fail)."""
    codes: dict[grpc.StatusCode, int] = {}
    options = [("grpc.max_metadata_size", 1 << 20)]  # the errors quote what was sent
    async with aio.insecure_channel(target, options=options) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        queue = iter(range(HOSTILE))

        async def worker() -> None:
            for i in queue:
                try:
                    await stub.ModelInfer(_hostile(i, x), timeout=30)
                except aio.AioRpcError as exc:
                    codes[exc.code()] = codes.get(exc.code(), 0) + 1
                else:
                    raise AssertionError(f"hostile query {i} was answered")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return codes


def test_failed_queries_with_unique_long_names_leave_memory_bounded(tmp_path: Path) -> None:
    cp_metrics, node_metrics = free_port(), free_port()
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--metrics-listen", f"127.0.0.1:{cp_metrics}"])
        node = mesh.start_node(
            "n1",
            [cp.address],
            direct=True,
            extra=["--metrics-listen", f"127.0.0.1:{node_metrics}"],
        )
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", make_mlp(tmp_path / "mlp.onnx"))
            wait_copies(admin, "mlp", 1)
            direct = wait_until(
                lambda: next(
                    (n.direct_address for n in admin.list_nodes() if n.direct_address), ""
                ),
                30,
                what="n1's direct address",
            )
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        # Warm both paths (channels, first-call allocations) before measuring.
        asyncio.run(_send_warmup([cp.address, direct], x))
        before = {"gateway": _rss(cp.pid), "node": _rss(node.pid)}
        for target in (cp.address, direct):
            codes = asyncio.run(_send_hostile(target, x))
            assert sum(codes.values()) == HOSTILE, codes
            assert grpc.StatusCode.INTERNAL not in codes, codes
        after = {"gateway": _rss(cp.pid), "node": _rss(node.pid)}
        cp_rows, node_rows = _request_rows(cp_metrics), _request_rows(node_metrics)
        assert cp.alive() and node.alive()

    growth_mib = {k: (after[k] - before[k]) >> 20 for k in before}
    assert max(growth_mib.values()) < RSS_BOUND >> 20, f"RSS growth (MiB): {growth_mib}"
    # Plain numbers and short texts only below: the rows would hold 64 KiB labels on failure.
    sizes = (len(cp_rows), len(node_rows))
    assert max(sizes) <= ROWS_BOUND, f"label sets (gateway, node): {sizes}"
    longest = max(len(v) for row in (*cp_rows, *node_rows) for v in row.values())
    assert longest <= 64, f"a label {longest} characters long: a client's string"
    models = {r["model"] for r in (*cp_rows, *node_rows) if r["hop"] in ("gateway", "node")}
    assert models <= {"mlp", "(unknown)"}, sorted(m[:20] for m in models)


async def _send_warmup(targets: list[str], x: np.ndarray) -> None:
    """A few failed queries to each target, so first-use allocations are not counted."""
    for target in targets:
        async with aio.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            for name in ("no-such-model", "mlp"):
                request = build_request(name, {"x": x})
                request.model_version = "no-such-version"
                try:
                    await stub.ModelInfer(request, timeout=30)
                except aio.AioRpcError:
                    pass
