"""Bad input gets a precise status, and the servers keep serving.

Real etcd, an in-process control plane and two in-process nodes (``edge`` is tunnel-only,
``core`` serves directly) with real onnxruntime sessions; each model is pinned to one tier so
both paths are checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio

from meshserve.client import AsyncMeshClient, MeshError
from meshserve.client._admin import AdminClient
from meshserve.common.codec import build_request
from meshserve.devtools.demo_models import make_mlp, sha256_file, write_not_onnx
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2
from tests.support.etcd import EtcdServer
from tests.support.inproc import InProcMesh, eventually, inproc_mesh, register_by_tier

MAX_MESSAGE = 1 << 20


@pytest.fixture
async def mesh(etcd: EtcdServer, tmp_path: Path) -> AsyncIterator[InProcMesh]:
    model = make_mlp(tmp_path / "mlp.onnx")
    async with inproc_mesh(
        etcd.url, tmp_path, [("edge", False), ("core", True)], max_message_bytes=MAX_MESSAGE
    ) as m:
        await register_by_tier(m, model, ("edge", "core"))
        yield m


async def _infer(target: str, request: inference_pb2.ModelInferRequest) -> None:
    async with aio.insecure_channel(target) as channel:
        await inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)


async def _status(
    target: str, request: inference_pb2.ModelInferRequest
) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as info:
        await _infer(target, request)
    return info.value.code(), info.value.details() or ""


async def _still_serves(mesh: InProcMesh, model: str) -> None:
    async with AsyncMeshClient(mesh.address) as client:
        result = await client.infer(model, {"x": np.zeros((2, 64), np.float32)})
    assert result["y"].shape == (2, 10)


async def test_unknown_model_is_not_found(mesh: InProcMesh) -> None:
    request = build_request("no-such-model", {"x": np.zeros((1, 64), np.float32)})
    code, message = await _status(mesh.address, request)
    assert code == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in message


@pytest.mark.parametrize("tier", ["edge", "core"], ids=["tunnel", "direct"])
async def test_wrong_inputs_are_invalid_argument_naming_the_input(
    mesh: InProcMesh, tier: str
) -> None:
    model = f"mlp-{tier}"
    wrong_type = build_request(model, {"x": np.zeros((1, 64), np.int32)})
    wrong_shape = build_request(model, {"x": np.zeros((1, 63), np.float32)})
    wrong_name = build_request(model, {"z": np.zeros((1, 64), np.float32)})
    short_raw = build_request(model, {"x": np.zeros((1, 64), np.float32)})
    short_raw.raw_input_contents[0] = b"\x00" * 100  # 100 bytes for a [1, 64] FP32 tensor
    for request, needle in (
        (wrong_type, "datatype INT32"),
        (wrong_shape, "shape [1, 63]"),
        (wrong_name, "'z'"),
        (short_raw, "100 bytes"),
    ):
        code, message = await _status(mesh.address, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
        assert needle in message
        assert "'x'" in message or "'z'" in message, message
    await _still_serves(mesh, model)


async def test_request_over_max_message_size_is_resource_exhausted(mesh: InProcMesh) -> None:
    big = np.zeros((MAX_MESSAGE // 256 + 10, 64), np.float32)  # > 1 MiB of raw bytes
    code, _ = await _status(mesh.address, build_request("mlp-edge", {"x": big}))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await _still_serves(mesh, "mlp-edge")


@pytest.mark.parametrize("case", ["sha256-mismatch", "not-onnx"])
async def test_bad_artifact_fails_with_reason_and_is_never_served(
    mesh: InProcMesh, tmp_path: Path, case: str
) -> None:
    if case == "sha256-mismatch":
        path, sha, reason = make_mlp(tmp_path / "other.onnx", seed=7), "ab" * 32, "sha256 mismatch"
    else:
        path = write_not_onnx(tmp_path / "garbage.onnx")
        sha, reason = sha256_file(path), "not a loadable ONNX model"
    with AdminClient(mesh.address) as admin:
        await asyncio.to_thread(admin.register_model, "bad", path.as_uri(), sha)

    def failed() -> dict[str, str]:
        placement = mesh.cp.snapshot().placements.get(("bad", "default"))
        return dict(placement.failed) if placement is not None else {}

    failures = await eventually(lambda: len(failed()) == 2 and failed(), what="both copies FAILED")
    assert all(reason in why for why in failures.values()), failures
    assert not mesh.cp.snapshot().ready_nodes(("bad", "default"))
    for node in mesh.nodes:
        assert all(e.state != mesh_pb2.READY for e in node.copies.entries() if e.model == "bad")
    async with AsyncMeshClient(mesh.address) as client:
        assert await client.model_ready("bad") is False
        with pytest.raises(MeshError) as info:
            await client.infer("bad", {"x": np.zeros((1, 64), np.float32)})
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    # the client learns that the copy failed, not why (the reason is for admins)
    assert "failed to load" in info.value.message and reason not in info.value.message
    await _still_serves(mesh, "mlp-edge")
    await _still_serves(mesh, "mlp-core")
