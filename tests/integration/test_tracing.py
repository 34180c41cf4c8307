"""One query is one trace: SDK → gateway (route, forward) → (tunnel) → node (cache, queue,
batch) spans share a trace id and chain; a retry is a second forward attempt in the same trace."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshserve.client import AsyncMeshClient
from meshserve.client._admin import AdminClient
from meshserve.common.errors import Unavailable
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.protos import inference_pb2, mesh_pb2
from tests.support.etcd import EtcdServer
from tests.support.inproc import InProcMesh, eventually, inproc_mesh

_EXPORTER = InMemorySpanExporter()
BATCHED_CACHED = mesh_pb2.ServingConfig(
    batching=mesh_pb2.BatchingConfig(enabled=True, max_batch_size=8), cache=True
)


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    """Export this process's spans to ``_EXPORTER`` too, whichever test set the provider (the
    global provider can be set once per process; a later call is ignored)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))


async def _register(
    mesh: InProcMesh, path: Path, serving: mesh_pb2.ServingConfig | None = None, copies: int = 1
) -> None:
    with AdminClient(mesh.address) as admin:  # blocking client: keep it off the loop
        await asyncio.to_thread(
            admin.register_model,
            "mlp",
            path.as_uri(),
            sha256_file(path),
            serving=serving,
            copies=copies,
        )
    await eventually(
        lambda: len(mesh.cp.snapshot().ready_nodes(("mlp", "default"))) == copies,
        what=f"{copies} ready copies",
    )


def _gateway_client(address: str) -> AsyncMeshClient:
    """An SDK that sends every query through the gateway at ``address`` (the traces here are
    the gateway's; an SDK routing itself is traced in its own tests)."""
    try:
        return AsyncMeshClient(address, routing="gateway")  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # an SDK without routing of its own talks to gateways
        return AsyncMeshClient(address)


def _named(spans: Sequence[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def _parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    return int(span.parent.span_id)


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def _trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def _number(span: ReadableSpan, key: str) -> float:
    value = (span.attributes or {}).get(key)
    assert isinstance(value, int | float), f"{span.name} {key} = {value!r}"
    return float(value)


@pytest.mark.parametrize(
    ("direct", "mux"), [(False, True), (True, True), (True, False)], ids=["tunnel", "mux", "unary"]
)
async def test_one_query_is_one_trace(
    etcd: EtcdServer, tmp_path: Path, direct: bool, mux: bool
) -> None:
    """Through the tunnel, the multiplexed stream to the node's port (the gateway's default) and
    unary calls to it: the node's span is a child of the gateway's forward span."""
    async with inproc_mesh(etcd.url, tmp_path, [("n1", direct)]) as mesh:
        await _register(mesh, make_mlp(tmp_path / "mlp.onnx"))
        assert mesh.cp.gateway is not None
        mesh.cp.gateway.forwarder.mux = mux
        async with _gateway_client(mesh.address) as client:
            _EXPORTER.clear()
            x = np.ones((1, 64), dtype=np.float32)
            result = await client.infer("mlp", {"x": x})
            assert result.node == "n1"
    spans = {s.name: s for s in _EXPORTER.get_finished_spans()}
    sdk, gateway, route, forward, node = (
        spans["client ModelInfer"],
        spans["gateway ModelInfer"],
        spans["gateway route"],
        spans["gateway forward"],
        spans["node ModelInfer"],
    )
    assert len({_trace_id(s) for s in (sdk, gateway, route, forward, node)}) == 1
    assert _parent_of(gateway) == _id(sdk)
    assert _parent_of(route) == _id(gateway)
    assert _parent_of(forward) == _id(gateway)
    assert _parent_of(node) == _id(forward), "the node's parent is the attempt that reached it"
    assert node.attributes is not None and gateway.attributes is not None
    assert node.attributes["meshserve.hop"] == (
        ("mux" if mux else "direct") if direct else "tunnel"
    )
    assert gateway.attributes["meshserve.path"] == ("direct" if direct else "tunnel")
    assert gateway.attributes["meshserve.node"] == "n1"
    assert dict(route.attributes or {}) == {
        "meshserve.candidates": 1,
        "meshserve.node": "n1",
        "meshserve.variant": "default",
        # every model has a `live` alias (its first version; issue 14 §1): the route names it
        "meshserve.route_reason": "alias live -> default",
    }
    assert dict(forward.attributes or {}) == {
        "meshserve.attempt": 1,
        "meshserve.node": "n1",
        "meshserve.path": "direct" if direct else "tunnel",
    }
    assert forward.kind == trace.SpanKind.CLIENT


async def test_a_batched_cached_query_traces_cache_queue_and_batch(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Through the tunnel into the batcher: the batch span is linked to the query's node span
    and the query's queue span to the batch; the copy's load and warm-up are spans too."""
    async with inproc_mesh(etcd.url, tmp_path, [("n1", False)]) as mesh:
        _EXPORTER.clear()
        await _register(mesh, make_mlp(tmp_path / "mlp.onnx"), BATCHED_CACHED)
        loading = _named(_EXPORTER.get_finished_spans())
        async with _gateway_client(mesh.address) as client:
            _EXPORTER.clear()
            x = np.full((2, 64), 0.5, dtype=np.float32)
            result = await client.infer("mlp", {"x": x})
            assert result.node == "n1"
    (load,) = loading["node load"]
    (warmup,) = loading["node warmup"]
    assert _parent_of(warmup) == _id(load)
    assert load.attributes is not None and warmup.attributes is not None
    assert _number(load, "meshserve.load_seconds") > 0
    assert load.attributes["meshserve.batched"] is True
    assert "meshserve.memory_bytes" in load.attributes
    assert _number(warmup, "meshserve.warmup_seconds") > 0

    spans = _named(_EXPORTER.get_finished_spans())
    one = {name: found[0] for name, found in spans.items() if len(found) == 1}
    names = [
        "client ModelInfer",
        "gateway ModelInfer",
        "gateway route",
        "gateway forward",
        "node ModelInfer",
        "node cache",
        "node queue",
        "node batch",
    ]
    assert set(names) <= set(one), f"each exactly once: {sorted(spans)}"
    sdk, gateway, route, forward, node, cache, queue, batch = (one[n] for n in names)
    assert len({_trace_id(one[n]) for n in names}) == 1, "one query, one trace"
    assert _parent_of(gateway) == _id(sdk)
    assert _parent_of(route) == _id(gateway)
    assert _parent_of(forward) == _id(gateway)
    assert _parent_of(node) == _id(forward)
    for child in (cache, queue, batch):
        assert _parent_of(child) == _id(node), child.name
    assert cache.attributes is not None and cache.attributes["meshserve.cache_hit"] is False
    assert batch.attributes is not None
    assert batch.attributes["meshserve.batch_size"] == 2
    assert batch.attributes["meshserve.batch_requests"] == 1
    assert [link.context.span_id for link in batch.links] == [_id(node)]
    assert [link.context.span_id for link in queue.links] == [_id(batch)]
    assert cache.end_time is not None and queue.start_time is not None
    assert cache.end_time <= queue.start_time, "the lookup comes before the queue"


async def test_a_retry_is_a_second_forward_in_the_same_trace(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """The first copy tried answers UNAVAILABLE: a retry route span, a second forward attempt
    to the other node, whose node span is that attempt's child."""
    async with inproc_mesh(etcd.url, tmp_path, [("n1", False), ("n2", True)]) as mesh:
        await _register(mesh, make_mlp(tmp_path / "mlp.onnx"), copies=2)
        failed: list[str] = []
        for member in mesh.nodes:
            _fail_first_query(member.handler, member.config.node_id, failed)
        async with _gateway_client(mesh.address) as client:
            _EXPORTER.clear()
            result = await client.infer("mlp", {"x": np.ones((1, 64), dtype=np.float32)})
    assert len(failed) == 1 and result.node != failed[0]
    spans = _named(_EXPORTER.get_finished_spans())
    (gateway,) = spans["gateway ModelInfer"]
    first, second = sorted(spans["gateway forward"], key=lambda s: s.start_time or 0)
    routes = sorted(spans["gateway route"], key=lambda s: s.start_time or 0)
    assert len({_trace_id(s) for s in (gateway, first, second, *routes)}) == 1
    assert [r.attributes and r.attributes["meshserve.route_reason"] for r in routes] == [
        "alias live -> default",
        "retry",
    ]
    assert routes[1].attributes and routes[1].attributes["meshserve.candidates"] == 1
    assert first.attributes and second.attributes
    assert (first.attributes["meshserve.attempt"], second.attributes["meshserve.attempt"]) == (
        1,
        2,
    )
    assert first.attributes["meshserve.node"] == failed[0]
    assert second.attributes["meshserve.node"] == result.node
    assert first.status.status_code == trace.StatusCode.ERROR
    (node,) = spans["node ModelInfer"]
    assert _parent_of(node) == _id(second)
    assert "retry" in [e.name for e in gateway.events]


def _fail_first_query(handler: Any, node_id: str, failed: list[str]) -> None:
    """Make the mesh's first query (whichever node gets it) fail with UNAVAILABLE."""
    infer = handler.infer

    async def flaky(
        request: inference_pb2.ModelInferRequest, *args: Any, **kwargs: Any
    ) -> inference_pb2.ModelInferResponse:
        if not failed:
            failed.append(node_id)
            raise Unavailable(f"{node_id} is failing on purpose")
        response: inference_pb2.ModelInferResponse = await infer(request, *args, **kwargs)
        return response

    handler.infer = flaky
