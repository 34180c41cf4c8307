"""One query is one trace: SDK → gateway → (tunnel) → node spans share a trace id and chain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from client import AsyncMeshClient
from client._admin import AdminClient
from client.demo_models import make_mlp, sha256_file
from tests.support.etcd import EtcdServer
from tests.support.inproc import eventually, inproc_mesh

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)  # once per process; later calls are ignored


@pytest.mark.parametrize("direct", [False, True], ids=["tunnel", "direct"])
async def test_one_query_is_one_trace(etcd: EtcdServer, tmp_path: Path, direct: bool) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")
    async with inproc_mesh(etcd.url, tmp_path, [("n1", direct)]) as mesh:
        with AdminClient(mesh.address) as admin:  # blocking client: keep it off the loop
            await asyncio.to_thread(admin.register_model, "mlp", model.as_uri(), sha256_file(model))
        async with AsyncMeshClient(mesh.address) as client:
            await eventually(
                lambda: mesh.cp.snapshot().ready_nodes(("mlp", "default")), what="a ready copy"
            )
            _EXPORTER.clear()
            x = np.ones((1, 64), dtype=np.float32)
            result = await client.infer("mlp", {"x": x})
            assert result.node == "n1"
    spans = {s.name: s for s in _EXPORTER.get_finished_spans()}
    sdk, gateway, node = (
        spans["client ModelInfer"],
        spans["gateway ModelInfer"],
        spans["node ModelInfer"],
    )
    assert sdk.context.trace_id == gateway.context.trace_id == node.context.trace_id
    assert gateway.parent is not None and gateway.parent.span_id == sdk.context.span_id
    assert node.parent is not None and node.parent.span_id == gateway.context.span_id
    assert node.attributes["meshserve.hop"] == ("direct" if direct else "tunnel")
    assert gateway.attributes["meshserve.path"] == ("direct" if direct else "tunnel")
    assert gateway.attributes["meshserve.node"] == "n1"
