"""The node's data plane for real: warm-up before READY, batching, caching, ModelStreamInfer.

Real etcd, an in-process control plane and node (real gRPC servers on loopback, real
onnxruntime sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from meshserve.client import AsyncMeshClient
from meshserve.client._admin import AdminClient
from meshserve.common.codec import build_request, decode_response_outputs
from meshserve.devtools.demo_models import make_mlp, reference_outputs, sha256_file
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2
from tests.support.etcd import EtcdServer
from tests.support.inproc import InProcMesh, eventually, inproc_mesh

BATCHING = mesh_pb2.ServingConfig(
    batching=mesh_pb2.BatchingConfig(enabled=True, max_batch_size=16, max_queue_delay_us=5000),
    cache=False,
)


@pytest.fixture
async def mesh(etcd: EtcdServer, tmp_path: Path) -> AsyncIterator[InProcMesh]:
    # Copies run in worker threads here (as models slower than ~100 us always do), so that
    # requests arriving together visibly wait for the running batch and leave as one.
    async with inproc_mesh(etcd.url, tmp_path, [("core", True)], inline_max_us=0) as m:
        yield m


async def _register(
    mesh: InProcMesh, name: str, path: Path, serving: mesh_pb2.ServingConfig
) -> None:
    with AdminClient(mesh.address) as admin:
        await asyncio.to_thread(
            admin.register_model, name, path.as_uri(), sha256_file(path), serving=serving
        )
    await eventually(
        lambda: mesh.cp.snapshot().ready_nodes((name, "default")), what=f"{name} ready"
    )


async def test_copy_is_ready_only_after_warmup_and_first_query_is_warm(
    mesh: InProcMesh, tmp_path: Path
) -> None:
    node = mesh.nodes[0]
    seen: list[mesh_pb2.CopyStatus] = []
    node.copies.subscribe(seen.append)
    await _register(mesh, "mlp", make_mlp(tmp_path / "mlp.onnx", hidden=(512, 512)), BATCHING)
    ready = [s for s in seen if s.model == "mlp" and s.state == mesh_pb2.READY]
    assert ready, "no READY status was announced"
    assert ready[0].warmup_seconds > 0, "READY was announced before warm-up ran"
    assert ready[0].batched
    assert next(s.state for s in seen if s.model == "mlp") == mesh_pb2.LOADING

    # First real query after READY vs the median of the next 50, straight to the node's port.
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)

    def timed_queries(name: str) -> list[float]:
        request = build_request(name, {"x": x})
        with grpc.insecure_channel(node.direct_address) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            stub.ServerLive(inference_pb2.ServerLiveRequest())  # connect outside the timing
            # The client's and the server's first ModelInfer on this channel, not the copy's:
            with contextlib.suppress(grpc.RpcError):
                stub.ModelInfer(build_request("no-such-model", {"x": x}), timeout=10)
            times = []
            for _ in range(51):
                t0 = time.perf_counter()
                stub.ModelInfer(request, timeout=10)
                times.append(time.perf_counter() - t0)
            return times

    # A cold copy is slow on every fresh copy; a scheduling hiccup on a shared machine is not:
    # a second fresh copy is tried before calling it cold.
    attempts = []
    for attempt in range(2):
        name = "mlp" if attempt == 0 else "mlp-again"
        if attempt:
            path = make_mlp(tmp_path / "mlp-again.onnx", hidden=(512, 512))
            await _register(mesh, name, path, BATCHING)
        times = await asyncio.to_thread(timed_queries, name)
        first, median = times[0], statistics.median(times[1:])
        attempts.append(f"first {first * 1e3:.2f} ms vs median {median * 1e3:.2f} ms")
        if first <= 3 * median:
            break
    assert first <= 3 * median, "; ".join(attempts)


async def test_concurrent_requests_are_batched_and_answers_are_correct(
    mesh: InProcMesh, tmp_path: Path
) -> None:
    path = make_mlp(tmp_path / "mlp.onnx")
    await _register(mesh, "mlp", path, BATCHING)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 64)).astype(np.float32) for _ in range(64)]
    async with AsyncMeshClient(mesh.address) as client:
        results = await asyncio.gather(*(client.infer("mlp", {"x": x}) for x in xs))
    for x, result in zip(xs, results, strict=True):
        np.testing.assert_allclose(
            result["y"], reference_outputs(path, {"x": x})["y"], rtol=1e-5, atol=1e-5
        )
    entry = next(e for e in mesh.nodes[0].copies.entries() if e.model == "mlp")
    assert entry.batcher is not None
    stats = entry.batcher.stats
    assert stats.requests >= 64
    assert stats.batches < stats.requests, f"no batching happened: {stats}"
    assert max(stats.batch_size_histogram) > 1


async def test_identical_query_is_served_from_cache(mesh: InProcMesh, tmp_path: Path) -> None:
    await _register(
        mesh, "mlp", make_mlp(tmp_path / "mlp.onnx"), mesh_pb2.ServingConfig(cache=True)
    )
    cache = mesh.nodes[0].copies.cache
    x = np.ones((2, 64), np.float32)
    async with AsyncMeshClient(mesh.address) as client:
        first = await client.infer("mlp", {"x": x})
        hits = cache.stats().hits
        second = await client.infer("mlp", {"x": x})
        third = await client.infer("mlp", {"x": x * 2})
    assert first.parameters["meshserve_cache_hit"] is False
    assert second.parameters["meshserve_cache_hit"] is True
    assert third.parameters["meshserve_cache_hit"] is False
    assert cache.stats().hits == hits + 1
    np.testing.assert_array_equal(first["y"], second["y"])


async def test_model_stream_infer_answers_every_request_with_its_id(
    mesh: InProcMesh, tmp_path: Path
) -> None:
    path = make_mlp(tmp_path / "mlp.onnx")
    await _register(mesh, "mlp", path, BATCHING)
    xs = {f"req-{i}": np.full((1, 64), i, np.float32) for i in range(20)}

    async def requests() -> AsyncIterator[inference_pb2.ModelInferRequest]:
        for request_id, x in xs.items():
            yield build_request("mlp", {"x": x}, request_id=request_id)
        yield build_request("nope", {"x": xs["req-0"]}, request_id="bad")

    answers = {}
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        async for answer in stub.ModelStreamInfer(requests(), timeout=30):
            answers[answer.infer_response.id] = answer
    assert set(answers) == {*xs, "bad"}
    assert "NOT_FOUND" in answers["bad"].error_message
    for request_id, x in xs.items():
        assert answers[request_id].error_message == ""
        got = decode_response_outputs(answers[request_id].infer_response)["y"]
        np.testing.assert_allclose(
            got, reference_outputs(path, {"x": x})["y"], rtol=1e-5, atol=1e-5
        )
