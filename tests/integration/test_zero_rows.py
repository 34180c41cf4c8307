"""Zero-row queries against real servers (issue 16, Low 12): a node's drift monitor keeps nothing
of a query with no rows, on any path (the gateway's tunnel to a tunnel-only node, the gateway to
a direct node, the node's own port).

Real etcd, an in-process control plane and two in-process nodes with real gRPC servers and real
onnxruntime sessions (in-process so the node's monitor can be read). Before the fix each
zero-row answer stayed referenced in the monitor until a real row arrived: with no real traffic,
for ever.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from grpc import aio

from meshserve.common.codec import build_request
from meshserve.devtools.demo_models import make_mlp
from meshserve.protos import inference_pb2_grpc
from tests.support.etcd import EtcdServer
from tests.support.inproc import inproc_mesh, register_by_tier

ZERO_ROW_QUERIES = 300  # per path


async def _send_zero_rows(target: str, model: str, count: int) -> None:
    request = build_request(model, {"x": np.zeros((0, 64), np.float32)})
    async with aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(count):
            response = await stub.ModelInfer(request, timeout=10)
            assert list(response.outputs[0].shape) == [0, 10]


async def test_zero_row_queries_leave_nothing_in_the_drift_monitor(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")
    async with inproc_mesh(etcd.url, tmp_path, [("edge", False), ("core", True)]) as mesh:
        await register_by_tier(mesh, model, ("edge", "core"))
        edge, core = mesh.nodes
        await _send_zero_rows(mesh.address, "mlp-edge", ZERO_ROW_QUERIES)  # tunnel
        await _send_zero_rows(mesh.address, "mlp-core", ZERO_ROW_QUERIES)  # gateway -> port
        await _send_zero_rows(core.direct_address, "mlp-core", ZERO_ROW_QUERIES)  # the port

        monitors = {
            (node.config.node_id, e.model): e.monitor
            for node in (edge, core)
            for e in node.copies.entries()
            if e.monitor is not None
        }
        assert set(monitors) == {("edge", "mlp-edge"), ("core", "mlp-core")}
        held = {key: m.pending for key, m in monitors.items()}
        assert held == dict.fromkeys(monitors, 0), f"zero-row answers held: {held}"
        assert all(not m.windows for m in monitors.values()), "no rows, no window"
        # The monitor still counts real rows after them (positive control).
        await _send_rows(core.direct_address, "mlp-core")
        core_monitor = monitors[("core", "mlp-core")]
        assert core_monitor.pending == 1


async def _send_rows(target: str, model: str) -> None:
    x = np.random.default_rng(12).standard_normal((3, 64)).astype(np.float32)
    async with aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(build_request(model, {"x": x}), timeout=10)
