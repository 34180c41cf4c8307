"""Standalone gateways (``meshserve-gateway``): stateless, from the routing feed, N of them.

Real processes on loopback (etcd, a replica, nodes, gateways) for the answers and the kill -9;
an in-process mesh (same event loop, in-memory span exporter) for the trace trees.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshserve.client import AsyncMeshClient, MeshClient
from meshserve.client._admin import AdminClient
from meshserve.common.errors import StatusError
from meshserve.common.security import sync_channel
from meshserve.controlplane.dataplane.standalone import StandaloneConfig, StandaloneGateway
from meshserve.devtools.demo_models import make_mlp, reference_outputs, sha256_file
from meshserve.devtools.local import LocalMesh, wait_until
from meshserve.protos import inference_pb2, inference_pb2_grpc
from tests.support.etcd import EtcdServer
from tests.support.inproc import InProcMesh, eventually, inproc_mesh
from tests.support.mesh import register_file, wait_copies

_EXPORTER = InMemorySpanExporter()
X = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)


def _client(target: str, **kwargs: Any) -> MeshClient:
    """An SDK sending every query through the gateway(s) at ``target``."""
    try:
        return MeshClient(target, routing="gateway", **kwargs)  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # an SDK without routing of its own talks to gateways
        return MeshClient(target, **kwargs)


def _aclient(target: str) -> AsyncMeshClient:
    try:
        return AsyncMeshClient(target, routing="gateway")  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        return AsyncMeshClient(target)


def _model_ready(address: str, model: str) -> bool:
    with sync_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        return bool(stub.ModelReady(inference_pb2.ModelReadyRequest(name=model), timeout=2).ready)


# -- real processes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, str, Path]]:
    """etcd, one replica, two nodes with a direct port (``mlp``, two copies) and one tunnel-only
    node (``edge``, its only copy)."""
    tmp = tmp_path_factory.mktemp("standalone")
    model = make_mlp(tmp / "mlp.onnx")
    with LocalMesh(tmp, lease_ttl_s=3) as local:
        local.start_etcd()
        cp = local.start_controlplane("cp-1")
        for name in ("n1", "n2"):
            local.start_node(name, [cp.address], labels={"tier": "core"}, direct=True)
        local.start_node("n3", [cp.address], labels={"tier": "edge"})
        with AdminClient(cp.address) as admin:
            wait_until(lambda: len(admin.list_nodes()) == 3, 60, what="three nodes")
            register_file(admin, "mlp", model, copies=2, selector={"tier": "core"})
            register_file(admin, "edge", model, copies=1, selector={"tier": "edge"})
            wait_copies(admin, "mlp", 2)
            wait_copies(admin, "edge", 1)
        yield local, cp.address, model


def test_two_gateways_answer_alike_and_a_killed_one_loses_no_call(
    mesh: tuple[LocalMesh, str, Path],
) -> None:
    local, replica, model = mesh
    expected = reference_outputs(model, {"x": X})["y"]
    gateways = [local.start_gateway([replica]) for _ in range(2)]
    addresses = [address for _, address in gateways]
    for address in addresses:
        wait_until(partial(_model_ready, address, "mlp"), 30, what=f"{address} ready")
    for address in addresses:  # the same answers as in-process onnxruntime, through either
        with _client(address, timeout=10) as client:
            for _ in range(3):
                result = client.infer("mlp", {"x": X})
                np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
                assert result.node in ("n1", "n2")

    failures: list[str] = []
    answered = [0]
    stop_at = time.monotonic() + 8.0

    def load(client: MeshClient) -> None:
        for _ in range(5000):  # bounded in count and in time
            if time.monotonic() > stop_at:
                return
            try:
                result = client.infer("mlp", {"x": X})
                np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
                answered[0] += 1
            except (StatusError, AssertionError) as exc:
                failures.append(repr(exc))

    with _client(",".join(addresses), timeout=10) as client:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = [pool.submit(load, client) for _ in range(4)]
            time.sleep(2.5)
            before = answered[0]
            gateways[1][0].kill()  # SIGKILL, under load
            for future in running:
                future.result(timeout=30)
    assert failures == [], failures[:5]
    assert before > 20, "the load ran before the kill"
    assert answered[0] > before + 20, "and went on through the other gateway"


def test_a_tunnel_only_copy_is_reached_through_a_standalone_gateway(
    mesh: tuple[LocalMesh, str, Path],
) -> None:
    """``edge``'s only copy is on a node without a port: the gateway hands the query to the
    replica holding its stream. ModelReady and ModelMetadata answer from the feed."""
    local, replica, model = mesh
    _, address = local.start_gateway([replica])
    wait_until(lambda: _model_ready(address, "edge"), 30, what="edge ready at the gateway")
    expected = reference_outputs(model, {"x": X})["y"]
    with _client(address, timeout=10) as client:
        for _ in range(3):
            result = client.infer("edge", {"x": X})
            np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
            assert result.node == "n3"
        metadata = client.model_metadata("edge")
        assert [t.name for t in metadata.inputs] == ["x"]
    with sync_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert not stub.ModelReady(inference_pb2.ModelReadyRequest(name="nope"), timeout=2).ready
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(inference_pb2.ModelInferRequest(model_name="nope"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_sigterm_stops_a_gateway_cleanly(mesh: tuple[LocalMesh, str, Path]) -> None:
    local, replica, _ = mesh
    proc, address = local.start_gateway([replica])
    wait_until(lambda: _model_ready(address, "mlp"), 30, what="the gateway ready")
    with _client(address, timeout=10) as client:
        client.infer("mlp", {"x": X})  # a node stream open
    started = time.monotonic()
    proc.stop(grace_s=10.0)
    assert proc.proc is not None and proc.proc.returncode == 0, proc.tail()
    assert time.monotonic() - started < 8.0
    assert "stopped" in proc.tail(5)


# -- traces (in process) ----------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))


def _parent(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    return int(span.parent.span_id)


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def _shape(spans: Sequence[ReadableSpan]) -> list[tuple[str, str]]:
    """(span, parent) names of one query's trace, sorted: its tree's shape."""
    by_id = {_id(s): s for s in spans}
    out = []
    for span in spans:
        parent = by_id.get(int(span.parent.span_id)) if span.parent is not None else None
        out.append((span.name, parent.name if parent is not None else ""))
    return sorted(out)


async def _register(mesh: InProcMesh, path: Path, name: str, selector: dict[str, str]) -> None:
    with AdminClient(mesh.address) as admin:
        await asyncio.to_thread(
            admin.register_model, name, path.as_uri(), sha256_file(path), node_selector=selector
        )
    await eventually(
        lambda: len(mesh.cp.snapshot().ready_nodes((name, "default"))) == 1,
        what=f"a ready copy of {name}",
    )


async def _traced(target: str, model: str) -> list[ReadableSpan]:
    async with _aclient(target) as client:
        await client.infer(model, {"x": X})  # warm (streams open) before the traced query
        _EXPORTER.clear()
        await client.infer(model, {"x": X})
    return list(_EXPORTER.get_finished_spans())


async def test_the_trace_through_a_standalone_gateway_is_the_replicas(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Direct copy: the same tree through a standalone gateway as through the replica's
    (client → gateway ModelInfer → route, forward → node). Tunnel-only copy: the standalone
    gateway's forward is the parent of the replica's gateway span, whose tree is its own."""
    path = make_mlp(tmp_path / "mlp.onnx")
    async with inproc_mesh(etcd.url, tmp_path, [("n1", True), ("n2", False)]) as mesh:
        await _register(mesh, path, "mlp", {"tier": "core"})
        await _register(mesh, path, "edge", {"tier": "edge"})
        gateway = StandaloneGateway(StandaloneConfig(feed=[mesh.address], listen="127.0.0.1:0"))
        await gateway.start()
        try:
            await gateway.wait_ready(10)
            assert gateway.feed is not None
            await eventually(
                lambda: (
                    gateway.feed is not None
                    and gateway.feed.snapshot().ready_count(("edge", "default")) == 1
                ),
                what="the feed to show edge's copy",
            )
            through_replica = await _traced(mesh.address, "mlp")
            through_standalone = await _traced(gateway.address, "mlp")
            relayed = await _traced(gateway.address, "edge")
        finally:
            await gateway.stop()

    direct_shape = [
        ("client ModelInfer", ""),
        ("gateway ModelInfer", "client ModelInfer"),
        ("gateway forward", "gateway ModelInfer"),
        ("gateway route", "gateway ModelInfer"),
        ("node ModelInfer", "gateway forward"),
    ]
    assert _shape(through_replica) == direct_shape
    assert _shape(through_standalone) == direct_shape
    forward = next(s for s in through_standalone if s.name == "gateway forward")
    node = next(s for s in through_standalone if s.name == "node ModelInfer")
    assert _parent(node) == _id(forward)
    assert forward.attributes is not None and forward.attributes["meshserve.path"] == "direct"
    assert node.attributes is not None and node.attributes["meshserve.hop"] == "mux"
    assert len({s.context.trace_id for s in through_standalone if s.context}) == 1

    assert _shape(relayed) == sorted(
        [
            ("client ModelInfer", ""),
            ("gateway ModelInfer", "client ModelInfer"),  # the standalone gateway
            ("gateway route", "gateway ModelInfer"),
            ("gateway forward", "gateway ModelInfer"),  # path replica
            ("gateway ModelInfer", "gateway forward"),  # the replica's gateway
            ("gateway route", "gateway ModelInfer"),
            ("gateway forward", "gateway ModelInfer"),  # path tunnel
            ("node ModelInfer", "gateway forward"),
        ]
    )
    paths = sorted(
        str((s.attributes or {}).get("meshserve.path"))
        for s in relayed
        if s.name == "gateway forward"
    )
    assert paths == ["replica", "tunnel"]
    assert len({s.context.trace_id for s in relayed if s.context}) == 1
