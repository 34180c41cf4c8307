"""The SDK routes itself (issue 15 §3): answers equal in-process onnxruntime and name the node; a
node killed with kill -9 under load costs no call (retry on the other copy); a tunnel-only copy
is reached through the gateway; a silent feed sends queries to the gateway; the blocking client
routes directly too.

Real etcd, real control-plane replicas and node processes on loopback
(:class:`~meshserve.devtools.local.LocalMesh`), real onnxruntime; the SDK runs in this process,
so its spans (``client route``: ``meshserve.path`` = direct | gateway) are read from an in-memory
exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from meshserve.client import AsyncMeshClient, MeshClient, RetryPolicy
from meshserve.client._admin import AdminClient
from meshserve.common.routing import feed as feed_module
from meshserve.devtools.demo_models import make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, ManagedProcess, free_port, wait_until
from tests.support.etcd import EtcdServer
from tests.support.inproc import eventually, inproc_mesh
from tests.support.mesh import register_file, wait_copies

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_EXPORTER = InMemorySpanExporter()
X = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    """Export this process's spans to ``_EXPORTER`` too (the global provider is set once per
    process; whichever test set it, a processor is added)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture(autouse=True)
def _spans() -> Iterator[None]:
    _EXPORTER.clear()
    yield
    _EXPORTER.clear()


def _routes(spans: Sequence[ReadableSpan] | None = None) -> list[dict[str, Any]]:
    """The attributes of every ``client route`` span finished so far."""
    spans = _EXPORTER.get_finished_spans() if spans is None else spans
    return [dict(s.attributes or {}) for s in spans if s.name == "client route"]


def _paths() -> list[str]:
    return [str(r.get("meshserve.path")) for r in _routes()]


def _mesh_with(
    mesh: LocalMesh,
    tmp_path: Path,
    nodes: Sequence[tuple[str, bool]],
    copies: int,
    replicas: int = 1,
) -> tuple[list[ManagedProcess], dict[str, ManagedProcess], Path]:
    """etcd, ``replicas`` control planes, ``nodes`` ((name, direct) pairs) and the MLP with
    ``copies`` READY copies."""
    mesh.start_etcd()
    planes = [mesh.start_controlplane(f"cp-{i + 1}") for i in range(replicas)]
    addresses = [p.address for p in planes]
    started = {name: mesh.start_node(name, addresses, direct=direct) for name, direct in nodes}
    model = make_mlp(tmp_path / "mlp.onnx")
    with AdminClient(planes[0].address) as admin:
        register_file(admin, "mlp", model, copies=copies)
        wait_copies(admin, "mlp", copies)
    return planes, started, model


async def _until_direct(client: AsyncMeshClient, timeout: float = 10.0) -> None:
    """Query until the client routes directly (its feed shows the copies with addresses)."""
    deadline = time.monotonic() + timeout
    while True:
        _EXPORTER.clear()
        await client.infer("mlp", {"x": X})
        if _paths() == ["direct"]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the SDK never routed directly (paths: {_paths()})")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_routed_answers_equal_in_process_onnxruntime_and_name_the_node(
    tmp_path: Path, transport: str
) -> None:
    with LocalMesh(tmp_path) as mesh:
        planes, _, model = _mesh_with(mesh, tmp_path, [("node-a", True), ("node-b", True)], 2)
        expected = reference_outputs(model, {"x": X})["y"]

        async def run() -> set[str]:
            async with AsyncMeshClient(
                planes[0].address,
                transport=transport,  # type: ignore[arg-type]
            ) as client:
                await _until_direct(client)
                _EXPORTER.clear()
                nodes = set()
                for _ in range(20):
                    result = await client.infer("mlp", {"x": X})
                    np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
                    assert result.variant == "default"
                    nodes.add(result.node)
                routes = _routes()
                assert {r["meshserve.path"] for r in routes} == {"direct"}
                assert {r["meshserve.node"] for r in routes} == nodes
                return nodes

        nodes = asyncio.run(run())
        assert nodes <= {"node-a", "node-b"} and nodes


def test_kill_9_of_the_node_the_sdk_sends_to_under_load_fails_no_call(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        planes, nodes, model = _mesh_with(mesh, tmp_path, [("node-a", True), ("node-b", True)], 2)
        expected = reference_outputs(model, {"x": X})["y"]

        async def run() -> tuple[int, int, dict[str, int]]:
            async with AsyncMeshClient(planes[0].address, timeout=10) as client:
                await _until_direct(client)
                ok = failed = 0
                answered: dict[str, int] = {}
                stop = time.monotonic() + 3.0

                async def worker() -> None:
                    nonlocal ok, failed
                    while time.monotonic() < stop:
                        try:
                            result = await client.infer("mlp", {"x": X})
                        except Exception as exc:
                            failed += 1
                            print(f"failed: {exc!r}")
                            continue
                        np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
                        answered[result.node] = answered.get(result.node, 0) + 1
                        ok += 1

                async def killer() -> None:
                    await asyncio.sleep(1.0)  # both copies answering by now
                    victim = max(answered, key=lambda n: answered[n])  # the one it sends to
                    nodes[victim].kill()

                await asyncio.gather(*(worker() for _ in range(4)), killer())
                return ok, failed, answered

        ok, failed, answered = asyncio.run(run())
        assert failed == 0, f"{failed} failed calls ({ok} answered: {answered})"
        assert ok > 20
        assert len(answered) == 2, answered  # both copies answered before the kill
        retried = [
            r
            for r in _routes()
            if str(r.get("meshserve.route_reason", "")).startswith("retry")
            or "every direct copy failed" in str(r.get("meshserve.fallback", ""))
        ]
        print(f"answered {answered}, {len(retried)} sends after a failed copy")
        assert retried, "the kill was never noticed by a query (nothing retried)"


def test_a_frozen_node_costs_no_call_the_stalled_attempt_moves_to_the_other_copy(
    tmp_path: Path,
) -> None:
    """A grey failure: the node the SDK sends to is stopped (SIGSTOP, connections stay open, no
    answer). A first attempt that stalls (0.5 s at least) is retried on the other copy."""
    with LocalMesh(tmp_path) as mesh:
        planes, nodes, model = _mesh_with(mesh, tmp_path, [("node-a", True), ("node-b", True)], 2)
        expected = reference_outputs(model, {"x": X})["y"]

        async def run() -> tuple[int, list[str], dict[str, int]]:
            async with AsyncMeshClient(planes[0].address, timeout=10) as client:
                await _until_direct(client)
                answered: dict[str, int] = {}
                failures: list[str] = []
                ok = 0

                async def worker(stop: float) -> None:
                    nonlocal ok
                    while time.monotonic() < stop:
                        try:
                            result = await client.infer("mlp", {"x": X})
                        except Exception as exc:
                            failures.append(repr(exc))
                            continue
                        np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
                        answered[result.node] = answered.get(result.node, 0) + 1
                        ok += 1

                await asyncio.gather(*(worker(time.monotonic() + 0.5) for _ in range(2)))
                nodes["node-a"].signal(signal.SIGSTOP)
                try:
                    answered.clear()
                    await asyncio.gather(*(worker(time.monotonic() + 3.0) for _ in range(2)))
                finally:
                    nodes["node-a"].signal(signal.SIGCONT)
                return ok, failures, answered

        try:
            ok, failures, answered = asyncio.run(run())
        finally:
            with contextlib.suppress(Exception):
                nodes["node-a"].signal(signal.SIGCONT)
        assert not failures, failures[:3]
        assert ok > 10, ok
        assert set(answered) == {"node-b"}, answered  # node-a answered nothing while stopped
        # every attempt that failed was one on the frozen node (cut short as stalled); how many
        # were sent there before its estimate rose depends on the machine's load
        failed = [r for r in _routes() if r.get("meshserve.error")]
        assert all(r["meshserve.node"] == "node-a" for r in failed), failed


def test_a_tunnel_only_copy_is_reached_through_the_gateway(tmp_path: Path) -> None:
    with LocalMesh(tmp_path) as mesh:
        planes, _, model = _mesh_with(mesh, tmp_path, [("edge-1", False)], 1)
        expected = reference_outputs(model, {"x": X})["y"]

        async def run() -> None:
            async with AsyncMeshClient(planes[0].address) as client:
                # the feed shows the copy (no direct address) before the queries that count
                await asyncio.sleep(0.5)
                for _ in range(5):
                    _EXPORTER.clear()
                    result = await client.infer("mlp", {"x": X})
                    np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
                    assert result.node == "edge-1"
                    (route,) = _routes()
                    assert route["meshserve.path"] == "gateway"
                assert route["meshserve.fallback"] == "no direct copy"
                assert route["meshserve.variant"] == "default"

        asyncio.run(run())


def test_a_silent_feed_sends_queries_to_the_gateway_and_answers_keep_coming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The feed client itself gives a silent stream up after 3 heartbeats and moves to another
    # replica (the SDK would route directly again at once); here it waits 10 heartbeats, so
    # the SDK's own rule (silent for 3 heartbeats: the gateway answers) is what is seen.
    monkeypatch.setattr(feed_module, "_SILENT_HEARTBEATS", 10.0)
    with LocalMesh(tmp_path) as mesh:
        planes, _, model = _mesh_with(
            mesh, tmp_path, [("node-a", True), ("node-b", True)], 2, replicas=2
        )
        gateway, feeder = planes
        expected = reference_outputs(model, {"x": X})["y"]

        async def run() -> tuple[list[str], int]:
            async with AsyncMeshClient(gateway.address, feed=feeder.address) as client:
                await _until_direct(client)
                _EXPORTER.clear()
                feeder.signal(signal.SIGSTOP)
                try:
                    stop = time.monotonic() + 5.0
                    count = 0
                    while time.monotonic() < stop:
                        result = await client.infer("mlp", {"x": X}, timeout=5)
                        np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
                        assert result.node in ("node-a", "node-b")
                        count += 1
                        await asyncio.sleep(0.01)
                finally:
                    feeder.signal(signal.SIGCONT)
                return _paths(), count

        try:
            paths, count = asyncio.run(run())
        finally:
            with contextlib.suppress(Exception):
                feeder.signal(signal.SIGCONT)
        assert count > 20
        assert paths[0] == "direct"  # the feed was fresh when it stopped
        assert paths[-1] == "gateway"  # silent for 3 heartbeats by the end
        falls = [r for r in _routes() if r["meshserve.path"] == "gateway"]
        assert all("silent" in str(r["meshserve.fallback"]) for r in falls)


def _gateway_queries(port: int) -> float:
    """Queries the replica's gateway counted (``meshserve_requests_total``, hop=gateway)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "meshserve_requests_total" and s.labels.get("hop") == "gateway"
    )


def test_the_blocking_client_routes_directly_too(tmp_path: Path) -> None:
    port = free_port()
    with LocalMesh(tmp_path) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--metrics-listen", f"127.0.0.1:{port}"])
        mesh.start_node("node-a", [cp.address], direct=True)
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", model)
            wait_copies(admin, "mlp", 1)
        expected = reference_outputs(model, {"x": X})["y"]
        with MeshClient(cp.address) as client:

            def direct() -> bool:
                _EXPORTER.clear()
                client.infer("mlp", {"x": X})
                return _paths() == ["direct"]

            wait_until(direct, 10, what="the blocking client to route directly")
            _EXPORTER.clear()
            before = _gateway_queries(port)
            for _ in range(10):
                result = client.infer("mlp", {"x": X}, slo_ms=10_000)
                np.testing.assert_allclose(result["y"], expected, rtol=1e-6, atol=1e-6)
                assert result.node == "node-a"
                assert result.slo_met is True  # measured by the SDK itself
            assert _paths() == ["direct"] * 10
            spans = _EXPORTER.get_finished_spans()
            roots = {s.context.span_id for s in spans if s.name == "client ModelInfer"}
            parents = {s.parent.span_id for s in spans if s.name == "client route" and s.parent}
            assert parents == roots and len(roots) == 10
            time.sleep(1.5)  # metrics export on an interval
            assert _gateway_queries(port) == before  # no hop through the gateway
        # hedged (a second send after 5 s): the routed attempt runs on the client's pool
        with MeshClient(cp.address, retry=RetryPolicy(hedge_after_s=5.0)) as hedged:
            wait_until(
                lambda: hedged.infer("mlp", {"x": X}).node == "node-a", 10, what="hedged answers"
            )
            _EXPORTER.clear()
            assert hedged.infer("mlp", {"x": X}).node == "node-a"
            assert _paths() == ["direct"]
        assert not any(t.name == "meshserve-feed" for t in threading.enumerate())


@pytest.mark.parametrize("transport", ["stream", "unary"])
async def test_the_sdks_route_span_is_the_parent_of_the_node_span(
    etcd: EtcdServer, tmp_path: Path, transport: str
) -> None:
    """In one process (so every hop's spans are seen): client ModelInfer -> client route (path
    direct) -> node ModelInfer, one trace, over the stream and over unary calls."""
    async with inproc_mesh(etcd.url, tmp_path, [("n1", True)]) as mesh:
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(mesh.address) as admin:
            await asyncio.to_thread(register_file, admin, "mlp", model)
        await eventually(
            lambda: mesh.cp.snapshot().ready_nodes(("mlp", "default")), what="a ready copy"
        )
        async with AsyncMeshClient(
            mesh.address,
            transport=transport,  # type: ignore[arg-type]
        ) as client:
            await _until_direct(client)
            _EXPORTER.clear()
            result = await client.infer("mlp", {"x": X})
            assert result.node == "n1"
    spans = _EXPORTER.get_finished_spans()
    names = [s.name for s in spans]
    assert "gateway ModelInfer" not in names, "no hop through the gateway"
    (sdk,) = [s for s in spans if s.name == "client ModelInfer"]
    (route,) = [s for s in spans if s.name == "client route"]
    (node,) = [s for s in spans if s.name == "node ModelInfer"]
    assert sdk.context and route.context and node.context
    assert len({s.context.trace_id for s in (sdk, route, node) if s.context}) == 1
    assert route.parent is not None and route.parent.span_id == sdk.context.span_id
    assert node.parent is not None and node.parent.span_id == route.context.span_id
    assert dict(route.attributes or {}) == {
        "meshserve.node": "n1",
        "meshserve.variant": "default",
        "meshserve.candidates": 1,
        "meshserve.route_reason": "alias live -> default",
        "meshserve.path": "direct",
        "meshserve.attempt": 1,
    }
    hop = "mux" if transport == "stream" else "direct"
    assert (node.attributes or {})["meshserve.hop"] == hop
