"""Latency profiles: a node measures each copy's run time per batch size after warm-up and
reports it (with the execution provider) to the control plane.

Real etcd, an in-process control plane and node (real gRPC servers on loopback, real
onnxruntime sessions).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_fixed_model, make_mlp, sha256_file
from meshserve.protos import mesh_pb2
from tests.support.etcd import EtcdServer
from tests.support.inproc import InProcMesh, eventually, inproc_mesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BATCHING = mesh_pb2.ServingConfig(
    batching=mesh_pb2.BatchingConfig(enabled=True, max_batch_size=8, preferred_batch_sizes=[2, 4]),
    cache=False,
)


@pytest.fixture
async def mesh(etcd: EtcdServer, tmp_path: Path) -> AsyncIterator[InProcMesh]:
    async with inproc_mesh(etcd.url, tmp_path, [("core", True)]) as m:
        yield m


async def _register_and_report(
    mesh: InProcMesh, name: str, path: Path, serving: mesh_pb2.ServingConfig
) -> mesh_pb2.CopyStatus:
    """Register ``name``, wait until it is READY, return the copy status ListNodes reports."""
    with AdminClient(mesh.address) as admin:
        await asyncio.to_thread(
            admin.register_model, name, path.as_uri(), sha256_file(path), serving=serving
        )
        await eventually(
            lambda: mesh.cp.snapshot().ready_nodes((name, "default")), what=f"{name} ready"
        )
        nodes = await asyncio.to_thread(admin.list_nodes)
    copies = [c for n in nodes for c in n.copies if c.model == name]
    assert len(copies) == 1, copies
    assert copies[0].state == mesh_pb2.READY
    return copies[0]


async def test_batched_copy_reports_a_profile_per_batch_size(
    mesh: InProcMesh, tmp_path: Path
) -> None:
    status = await _register_and_report(mesh, "mlp", make_mlp(tmp_path / "mlp.onnx"), BATCHING)
    profile = {p.batch_size: p.seconds for p in status.latency_profile}
    assert [p.batch_size for p in status.latency_profile] == [1, 2, 4, 8]  # sorted, all sizes
    assert all(seconds > 0 for seconds in profile.values()), profile
    assert profile[8] >= profile[1] * 0.5, profile
    assert profile[8] < 1.0, profile  # a small MLP: nothing absurd
    assert status.execution_provider == "CPUExecutionProvider"

    # The node's own entry agrees, and its batch-1 run time is the profile's figure.
    entry = next(e for e in mesh.nodes[0].copies.entries() if e.model == "mlp")
    assert entry.run_seconds == pytest.approx(profile[1])


async def test_model_without_batch_axis_reports_batch_size_one_only(
    mesh: InProcMesh, tmp_path: Path
) -> None:
    status = await _register_and_report(
        mesh, "fixed", make_fixed_model(tmp_path / "fixed.onnx"), BATCHING
    )
    assert [p.batch_size for p in status.latency_profile] == [1]
    assert status.latency_profile[0].seconds > 0
    assert status.execution_provider == "CPUExecutionProvider"
