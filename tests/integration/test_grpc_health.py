"""The standard gRPC services (issue 17 item 2): ``grpc.health.v1.Health`` and server reflection
on the control plane, a standalone gateway and a node's direct port, asked with the Python
clients a user (or a Kubernetes ``grpc:`` probe) uses -- real etcd, real processes on loopback.

Also retry pushback (item 6): a gateway refusing a query for load answers RESOURCE_EXHAUSTED
with gRPC's own ``grpc-retry-pushback-ms`` trailing metadata beside ``retry-after-ms``.

The tests share one mesh and run in order: every server serves; reflection lists every
service; an overloaded gateway pushes back; etcd stopped turns the replica NOT_SERVING and
back; last, a draining node turns NOT_SERVING (it is on its way out).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from meshserve.client._admin import AdminClient
from meshserve.client._retry import translate
from meshserve.common.codec import build_request
from meshserve.common.health import add_standard_services
from meshserve.devtools.demo_models import make_mlp
from meshserve.devtools.local import LocalMesh, ManagedProcess, free_port, wait_until
from meshserve.protos import inference_pb2, inference_pb2_grpc
from tests.support.mesh import register_file, wait_copies

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INFERENCE = "inference.GRPCInferenceService"
ADMIN = "meshserve.v1.Admin"
NODE_LINK = "meshserve.v1.NodeLink"
STANDARD = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
HELD_MS = 2000  # n1's --fault-delay-ms: a query stays in flight while the others arrive


@dataclass
class Mesh:
    local: LocalMesh
    cp: str
    gateway: str
    node: str
    node_proc: ManagedProcess
    limited: str  # a gateway admitting one query in flight per ready copy


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("health")
    with LocalMesh(work, lease_ttl_s=3) as local:
        local.start_etcd()
        cp = local.start_controlplane("cp-1").address
        node = f"127.0.0.1:{free_port()}"
        flags = ["--listen", node, "--drain-timeout-s", "30", "--fault-delay-ms", str(HELD_MS)]
        proc = local.start_node("n1", [cp], extra=flags)
        _, gateway = local.start_gateway([cp])
        _, limited = local.start_gateway([cp], extra=["--max-in-flight-per-copy", "1"])
        with AdminClient(cp) as admin:
            wait_until(lambda: len(admin.list_nodes()) == 1, 20, what="n1 linked")
            register_file(admin, "m", make_mlp(work / "m.onnx", in_features=4, hidden=(8,)))
            wait_copies(admin, "m", 1, timeout=60)
        yield Mesh(local, cp, gateway, node, proc, limited)


def check(address: str, service: str = "") -> int:
    """The status a ``Check`` answers (a refused call raises)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=3.0)
        return int(answer.status)


def first_watched(address: str, service: str = "") -> int:
    """The first status a ``Watch`` stream sends (the current one)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stream = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=3.0)
        try:
            return int(next(stream).status)
        finally:
            stream.cancel()


def test_every_server_serves_health_per_service(mesh: Mesh) -> None:
    expected = {
        mesh.cp: ("", INFERENCE, ADMIN, NODE_LINK, "meshserve.v1.RoutingFeed"),
        mesh.node: ("", INFERENCE, "meshserve.v1.NodeInference"),
        mesh.gateway: ("", INFERENCE),  # SERVING once its feed delivered a view
    }
    for address, services in expected.items():
        for service in services:
            wait_until(  # the gateway turns SERVING when its feed is ready
                lambda a=address, s=service: check(a, s) == SERVING,
                10,
                what=f"{address} {service!r} SERVING",
            )
        assert first_watched(address, INFERENCE) == SERVING
        with pytest.raises(grpc.RpcError) as info:  # a name the server lacks
            check(address, "no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_every_service(mesh: Mesh) -> None:
    expected = {
        mesh.cp: {INFERENCE, ADMIN, NODE_LINK, "meshserve.v1.RoutingFeed"},
        mesh.node: {INFERENCE, "meshserve.v1.NodeInference"},
        mesh.gateway: {INFERENCE},
    }
    for address, services in expected.items():
        with grpc.insecure_channel(address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            assert set(database.get_services()) == services | STANDARD, address
            pool = descriptor_pool.DescriptorPool(database)
            oip = pool.FindServiceByName(INFERENCE)  # under the name it answers at
            infer = oip.FindMethodByName("ModelInfer")
            assert infer.input_type.full_name == "meshserve.inference.ModelInferRequest"
            for name in services - {INFERENCE}:
                assert pool.FindServiceByName(name).methods, name


async def _at_once(address: str, count: int) -> list[grpc.aio.AioRpcError | None]:
    """``count`` queries at once; each one's error (None: answered)."""
    x = np.zeros((1, 4), np.float32)

    async def one(stub: inference_pb2_grpc.GRPCInferenceServiceStub, i: int) -> Any:
        try:
            await stub.ModelInfer(build_request("m", {"x": x + i}), timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc
        return None

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        await stub.ServerReady(inference_pb2.ServerReadyRequest(), timeout=10)  # connected
        return list(await asyncio.gather(*(one(stub, i) for i in range(count))))


def test_an_overloaded_gateway_pushes_back_with_the_standard_key(mesh: Mesh) -> None:
    wait_until(lambda: check(mesh.limited) == SERVING, 10, what="the limited gateway SERVING")
    outcomes = asyncio.run(_at_once(mesh.limited, 3))
    refused = [e for e in outcomes if e is not None]
    assert len(refused) == 2, [e and e.code() for e in outcomes]  # one held, two refused
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        trailing = dict(error.trailing_metadata() or ())
        assert int(trailing["grpc-retry-pushback-ms"]) >= 1, trailing
        assert trailing["retry-after-ms"] == trailing["grpc-retry-pushback-ms"]
        hint = translate(error).retry_after_s  # type: ignore[attr-defined]
        assert hint == int(trailing["grpc-retry-pushback-ms"]) / 1000


def test_a_replica_without_etcd_is_not_serving_until_it_is_back(mesh: Mesh) -> None:
    etcd = mesh.local.etcd
    etcd.stop()
    try:
        wait_until(lambda: check(mesh.cp) == NOT_SERVING, 30, what="cp NOT_SERVING without etcd")
        assert check(mesh.cp, ADMIN) == NOT_SERVING
        assert check(mesh.cp, NODE_LINK) == NOT_SERVING
        assert check(mesh.cp, INFERENCE) == SERVING  # queries go on from the last view
    finally:
        etcd.start()
    wait_until(lambda: check(mesh.cp) == SERVING, 30, what="cp SERVING with etcd back")
    assert check(mesh.cp, ADMIN) == SERVING


def test_a_draining_node_is_not_serving(mesh: Mesh) -> None:
    """SIGTERM: the node drains (its one copy has nowhere to go: it waits up to 30 s, still
    answering queries) and its health says NOT_SERVING meanwhile."""
    assert check(mesh.node) == SERVING
    mesh.node_proc.signal(signal.SIGTERM)
    wait_until(lambda: check(mesh.node) == NOT_SERVING, 10, what="n1 NOT_SERVING while draining")
    assert check(mesh.node, INFERENCE) == NOT_SERVING
    assert mesh.node_proc.alive()


async def test_a_watch_ends_when_the_server_shuts_down() -> None:
    """In-process: a watcher sees SERVING, then NOT_SERVING, then the end of its stream, so a
    stopping server does not wait its grace period on it."""
    server = grpc.aio.server()
    health = await add_standard_services(server, (INFERENCE,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stream = stub.Watch(health_pb2.HealthCheckRequest(service=INFERENCE), timeout=10)
            assert (await stream.read()).status == SERVING
            await health.shutdown()
            assert (await stream.read()).status == NOT_SERVING
            while (message := await stream.read()) is not grpc.aio.EOF:  # at most a repeat
                assert message.status == NOT_SERVING
            assert await stream.code() == grpc.StatusCode.OK
            await health.set(True)  # ignored once stopping
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == NOT_SERVING
    finally:
        await server.stop(None)


class _Counting(grpc.GenericRpcHandler):
    """``ModelReady`` answers ready and counts the calls it took (a stand-in OIP server)."""

    def __init__(self) -> None:
        self.calls = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        if details.method != f"/{INFERENCE}/ModelReady":
            return None

        async def ready(request: bytes, context: Any) -> bytes:
            self.calls += 1
            return inference_pb2.ModelReadyResponse(ready=True).SerializeToString()

        return grpc.unary_unary_rpc_method_handler(ready)


async def test_a_balanced_sdk_channel_skips_a_replica_that_stopped_serving() -> None:
    """Two real servers with the health service; the SDK's channel over both (round robin,
    client-side health checking) spreads calls over both, and once one turns NOT_SERVING (a
    replica stopping) sends every new call to the other -- so a stopping server that drains
    holds no call it has not started when it stops (the CANCELLED of grpc/grpc#41785). Its
    ``drain`` waits only because a client watched it."""
    from meshserve.client._retry import NO_RETRY, service_config
    from meshserve.client._sdk import channel_target

    servers, healths, counters, ports = [], [], [], []
    for _ in range(2):
        server = grpc.aio.server()
        counter = _Counting()
        server.add_generic_rpc_handlers((counter,))
        healths.append(await add_standard_services(server, (INFERENCE,)))
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
        counters.append(counter)
    target, options = channel_target(",".join(f"127.0.0.1:{p}" for p in ports))
    options.append(("grpc.service_config", service_config(NO_RETRY, balanced=True)))
    try:
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            ready = channel.unary_unary(
                f"/{INFERENCE}/ModelReady",
                request_serializer=inference_pb2.ModelReadyRequest.SerializeToString,
                response_deserializer=inference_pb2.ModelReadyResponse.FromString,
            )
            request = inference_pb2.ModelReadyRequest(name="m")
            for _ in range(40):
                assert (await ready(request, timeout=5, wait_for_ready=True)).ready
            assert counters[0].calls > 0 and counters[1].calls > 0, "round robin over both"
            loop = asyncio.get_running_loop()
            await healths[0].shutdown()
            started = loop.time()
            await healths[0].drain(0.5)  # a client watches: the drain waits
            assert loop.time() - started >= 0.45
            before = [c.calls for c in counters]
            for _ in range(40):
                assert (await ready(request, timeout=5)).ready
            assert counters[0].calls == before[0], "a NOT_SERVING server got new calls"
            assert counters[1].calls == before[1] + 40
    finally:
        for server in servers:
            await server.stop(None)
    lone = grpc.aio.server()  # nobody watched: no wait
    health = await add_standard_services(lone, (INFERENCE,))
    await health.shutdown()
    started = asyncio.get_running_loop().time()
    await health.drain(5.0)
    assert asyncio.get_running_loop().time() - started < 0.5
