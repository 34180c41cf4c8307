"""Failures that heal (issue 14 §3) and the node port's status for models it does not hold.

Real etcd, an in-process control plane and node (real gRPC on loopback, real onnxruntime), and a
real ``http.server`` on loopback as the artifact server: down at registration then started, serving
the wrong bytes then fixed, or trickling one byte per second. The control plane retries
transient failures on a short test backoff (1 s); waits are bounded.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio

from meshserve.client._admin import AdminClient
from meshserve.common.codec import build_request
from meshserve.controlplane.app import ControlPlane, ControlPlaneConfig
from meshserve.controlplane.placement.failures import RetryPolicy
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.devtools.local import free_port
from meshserve.node.app import Node, NodeConfig
from meshserve.protos import inference_pb2_grpc, mesh_pb2
from tests.support.etcd import EtcdServer
from tests.support.inproc import eventually

BACKOFF = RetryPolicy((1.0, 1.0))
MESHCTL = [sys.executable, "-m", "meshserve.client.cli"]


class _Artifacts(http.server.ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes, changeable while running); paths in ``trickle`` are
    sent one byte per second after their headers (until ``stop`` is set)."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.files: dict[str, bytes] = {}
        self.trickle: set[str] = set()
        self.stop = threading.Event()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Artifacts

    def do_GET(self) -> None:
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if self.path not in self.server.trickle:
                self.wfile.write(body)
                return
            for i in range(len(body)):
                if self.server.stop.wait(1.0):
                    return
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
        except OSError:
            return  # the node gave up on the download

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def artifact_server(port: int, files: Mapping[str, bytes]) -> Iterator[_Artifacts]:
    server = _Artifacts(port)
    server.files.update(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@asynccontextmanager
async def mesh(
    etcd: EtcdServer, tmp: Path, *, direct: bool = False, **node: float
) -> AsyncIterator[tuple[ControlPlane, Node]]:
    """One control plane (backoff :data:`BACKOFF`) and one node ``n1`` (``node``: NodeConfig
    download settings)."""
    cp = ControlPlane(
        ControlPlaneConfig(
            etcd_url=etcd.url,
            listen="127.0.0.1:0",
            replica_id="cp-heal",
            lease_ttl_s=3,
            retry=BACKOFF,
        )
    )
    await cp.start()
    n1 = Node(
        NodeConfig(
            control_planes=[cp.address],
            node_id="n1",
            listen="127.0.0.1:0" if direct else None,
            cache_dir=tmp / "n1-cache",
            **node,  # type: ignore[arg-type]
        )
    )
    try:
        await n1.start()
        await eventually(lambda: "n1" in cp.snapshot().nodes, what="n1 to join")
        yield cp, n1
    finally:
        await asyncio.wait_for(n1.stop(grace_s=1.0), 20)
        await asyncio.wait_for(cp.stop(grace_s=1.0), 20)


def placement(cp: ControlPlane, model: str) -> mesh_pb2.Placement:
    return cp.snapshot().placements.get((model, "default")) or mesh_pb2.Placement()


def ready(cp: ControlPlane, model: str) -> bool:
    return bool(cp.snapshot().ready_nodes((model, "default")))


async def register(address: str, model: str, uri: str, sha: str) -> None:
    with AdminClient(address) as admin:
        await asyncio.to_thread(admin.register_model, model, uri, sha)


async def test_download_that_failed_while_the_server_was_down_heals_by_itself(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    onnx = make_mlp(tmp_path / "mlp.onnx")
    port = free_port()
    uri = f"http://127.0.0.1:{port}/mlp.onnx"
    async with mesh(etcd, tmp_path) as (cp, _):
        await register(cp.address, "m", uri, sha256_file(onnx))  # the server is down
        failed = await eventually(
            lambda: "n1" in placement(cp, "m").failed and placement(cp, "m"),
            what="the copy to fail while the artifact server is down",
        )
        record = failed.failures["n1"]
        assert not record.permanent and record.retry_unix_ms > 0, record
        with AdminClient(cp.address) as admin:
            explained = await asyncio.to_thread(admin.explain_placement, "m")
        verdict = next(v for v in explained[0].nodes if v.node_id == "n1")
        assert verdict.filtered_by == "not_failed"
        assert "transient" in verdict.reason and "next automatic retry at" in verdict.reason
        with artifact_server(port, {"/mlp.onnx": onnx.read_bytes()}):
            # No re-registration: the leader retries on its backoff and the copy heals.
            await eventually(lambda: ready(cp, "m"), timeout=30, what="the copy to heal")
            await eventually(
                lambda: not placement(cp, "m").failures, what="the failure record to be dropped"
            )
        assert not placement(cp, "m").failed


async def test_meshctl_placements_retry_clears_a_permanent_failure_after_the_artifact_is_fixed(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    good = make_mlp(tmp_path / "good.onnx")
    wrong = make_mlp(tmp_path / "wrong.onnx", seed=7)
    port = free_port()
    uri = f"http://127.0.0.1:{port}/m.onnx"
    with artifact_server(port, {"/m.onnx": wrong.read_bytes()}) as server:
        async with mesh(etcd, tmp_path) as (cp, _):
            await register(cp.address, "m", uri, sha256_file(good))
            await eventually(lambda: "n1" in placement(cp, "m").failed, what="the sha256 mismatch")
            record = placement(cp, "m").failures["n1"]
            assert record.permanent and record.retry_unix_ms == 0, record
            assert "sha256 mismatch" in record.reason
            server.files["/m.onnx"] = good.read_bytes()  # fixed at the same uri
            await asyncio.sleep(3 * BACKOFF.backoff_s[0])  # a permanent failure waits
            assert "n1" in placement(cp, "m").failed and not ready(cp, "m")
            env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
            args = [*MESHCTL, "placements", "retry", "m", "--node", "n1", "--target", cp.address]
            proc = await asyncio.to_thread(
                subprocess.run, args, capture_output=True, text=True, timeout=60, env=env
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "n1" in proc.stdout and "permanent" in proc.stdout, proc.stdout
            await eventually(lambda: ready(cp, "m"), timeout=30, what="the retried copy")
            assert not placement(cp, "m").failed


async def test_a_trickling_download_does_not_block_another_load_and_fails_by_minimum_rate(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    slow = make_mlp(tmp_path / "slow.onnx", seed=3)
    fast = make_mlp(tmp_path / "fast.onnx", seed=4)
    port = free_port()
    files = {"/slow.onnx": slow.read_bytes(), "/fast.onnx": fast.read_bytes()}
    with artifact_server(port, files) as server:
        server.trickle.add("/slow.onnx")  # one byte per second
        bounded = mesh(etcd, tmp_path, download_min_rate_bps=64.0, download_rate_window_s=10.0)
        async with bounded as (cp, n1):
            base = f"http://127.0.0.1:{port}"
            await register(cp.address, "slow", f"{base}/slow.onnx", sha256_file(slow))
            slow_copy = await eventually(
                lambda: next((e for e in n1.copies.entries() if e.model == "slow"), None),
                what="the slow download to start",
            )
            await register(cp.address, "fast", f"{base}/fast.onnx", sha256_file(fast))
            await eventually(lambda: ready(cp, "fast"), timeout=20, what="the fast model")
            # Loaded while the trickling download is still in progress: it never held it up.
            assert slow_copy.state == mesh_pb2.LOADING, slow_copy
            record = await eventually(
                lambda: placement(cp, "slow").failures.get("n1"),
                timeout=20,
                what="the slow download to fail by the minimum-rate rule",
            )
            assert "too slow" in record.reason and "minimum of 64 bytes/s" in record.reason
            assert not record.permanent and record.retry_unix_ms > 0  # retried, with backoff
            assert ready(cp, "fast")


async def _code(address: str, model: str) -> tuple[grpc.StatusCode, str]:
    request = build_request(model, {"x": np.zeros((1, 64), np.float32)})
    async with aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as info:
            await stub.ModelInfer(request, timeout=10)
    return info.value.code(), info.value.details() or ""


async def test_node_port_answers_not_found_for_a_never_loaded_model_and_unavailable_for_a_moved_one(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    onnx = make_mlp(tmp_path / "mlp.onnx")
    async with mesh(etcd, tmp_path, direct=True) as (cp, n1):
        code, message = await _code(n1.direct_address, "never-here")
        assert code == grpc.StatusCode.NOT_FOUND, message
        assert "never-here" in message
        await register(cp.address, "m", onnx.as_uri(), sha256_file(onnx))
        await eventually(lambda: ready(cp, "m"), what="m ready")
        with AdminClient(cp.address) as admin:
            await asyncio.to_thread(admin.remove_model, "m")
        await eventually(lambda: not n1.copies.entries(), what="m unloaded from n1")
        code, message = await _code(n1.direct_address, "m")
        assert code == grpc.StatusCode.UNAVAILABLE, message
        assert "moved" in message
