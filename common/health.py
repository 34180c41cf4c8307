"""The standard gRPC services every meshserve server carries: health and reflection.

Contract:

* :func:`add_standard_services` adds ``grpc.health.v1.Health`` (grpcio-health-checking's asyncio
  servicer) and server reflection (grpcio-reflection, ``grpc.reflection.v1alpha``) to an aio
  server before it starts, and returns the :class:`Health` handle its owner flips.
* Health answers for the overall server (service ``""``) and for each named service; a name it
  does not know is NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch), as the protocol says. Neither
  service goes through the API-key / certificate guard: a Kubernetes ``grpc:`` probe carries no
  credentials, and neither answer says more than which services exist and whether they serve.
* Reflection lists every service the server registers (the named ones, health and reflection)
  under the names they answer at. The OIP service is declared in the private proto package
  ``meshserve.inference`` but answers at ``/inference.GRPCInferenceService/...`` (see
  ``protos/generate.py``), so reflection describes it from a wire copy: a small file
  (``meshserve/protos/inference_wire.proto``, package ``inference``) holding only the service,
  whose methods take and return the ``meshserve.inference.*`` messages -- the message names
  differ from Triton's ``inference.*`` but the wire format carries no names, so ``grpcurl``
  describes and calls it as it is served.
* :meth:`Health.shutdown` turns every service NOT_SERVING for good (draining, stopping): later
  flips are ignored, so a maintenance loop cannot turn a stopping server back to SERVING. Its
  ``Watch`` streams send NOT_SERVING and end (OK), so a stopping server never waits its grace
  period on a watcher (the library's streams last until the client goes).
* :meth:`Health.drain` (after :meth:`Health.shutdown`, before the server stops): when a client
  was watching (gRPC's client-side health checking, as the SDK's multi-replica channels do),
  waits until ``drain_s`` has passed since the shutdown, so those clients have moved their new
  calls elsewhere and the calls that reached this server before have been taken up. Stopping a
  server fails the calls it received but had not yet handed to a handler with CANCELLED
  (grpc/grpc#41785), which a client would not retry; a drained server has none.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from meshserve.protos import inference_pb2, mesh_pb2

__all__ = [
    "ADMIN",
    "DRAIN_S",
    "HEALTH",
    "INFERENCE",
    "NODE_INFERENCE",
    "NODE_LINK",
    "REFLECTION",
    "ROUTING_FEED",
    "Health",
    "add_standard_services",
]

INFERENCE = "inference.GRPCInferenceService"  # the OIP service's name on the wire
#: How long a stopping server keeps taking calls after it turned NOT_SERVING, when clients
#: balance on its health (:meth:`Health.drain`); its owner caps it at the stop's grace.
DRAIN_S = 1.0
ADMIN = mesh_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
NODE_LINK = mesh_pb2.DESCRIPTOR.services_by_name["NodeLink"].full_name
ROUTING_FEED = mesh_pb2.DESCRIPTOR.services_by_name["RoutingFeed"].full_name
NODE_INFERENCE = mesh_pb2.DESCRIPTOR.services_by_name["NodeInference"].full_name
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION: str = reflection.SERVICE_NAME

_WIRE_FILE = "meshserve/protos/inference_wire.proto"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@functools.cache
def _wire_pool() -> descriptor_pool.DescriptorPool:
    """The descriptors reflection serves: our protos, health, reflection, and the OIP service
    under its wire name (built once, on first use)."""
    pool = descriptor_pool.DescriptorPool()
    oip = descriptor_pb2.FileDescriptorProto()
    for module in (health_pb2, reflection_pb2, inference_pb2, mesh_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
        if module is inference_pb2:
            oip = proto
    package, _, name = INFERENCE.rpartition(".")
    wire = descriptor_pb2.FileDescriptorProto(
        name=_WIRE_FILE, package=package, syntax="proto3", dependency=[oip.name]
    )
    service = wire.service.add()
    service.CopyFrom(next(s for s in oip.service if s.name == name))
    for method in service.method:  # the messages stay where they are declared
        for field in ("input_type", "output_type"):
            type_name = getattr(method, field)
            if not type_name.startswith("."):
                setattr(method, field, f".{oip.package}.{type_name}")
    pool.Add(wire)
    return pool


class _Servicer(HealthServicer):  # type: ignore[misc]
    """The library's servicer (``Check``, ``set``) with a ``Watch`` of its own that ends once
    :meth:`end_watches` is called: each stream's writes all come from its one coroutine (the
    library's ``Watch``, cancelled mid-write to end it, left a send pending, and the last
    NOT_SERVING then failed with GRPC_CALL_ERROR_TOO_MANY_OPERATIONS)."""

    def __init__(self) -> None:
        super().__init__()
        self._status: dict[str, Any] = {}
        self._ended = False
        self._stopping = False  # graceful shutdown entered: every status stays NOT_SERVING
        self._changed = asyncio.Event()
        self.watched = False  # a Watch stream was opened (a client balances on our health)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def set(self, service: str, status: Any) -> None:
        await super().set(service, status)
        if not self._stopping:
            self._status[service] = status
            self._notify()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._stopping = True
        self._status = dict.fromkeys(self._status, _NOT_SERVING)
        self._notify()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        self.watched = True
        last = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, _UNKNOWN)
            if self._ended:
                status = _NOT_SERVING  # the last word
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._ended:
                return
            await changed.wait()

    def end_watches(self) -> None:
        self._ended = True
        self._notify()


class Health:
    """The serving state a server's health service reports (see the module contract)."""

    def __init__(self, servicer: _Servicer, services: Sequence[str]) -> None:
        self._servicer = servicer
        self.services = ("", *services)  # "" is the server as a whole
        self._state = dict.fromkeys(self.services, True)
        self.stopping = False
        self._stopped_at: float | None = None  # loop time of shutdown()

    async def set(self, serving: bool, services: Iterable[str] | None = None) -> None:
        """Set ``services`` (default: all, the overall ``""`` included) SERVING or NOT_SERVING;
        no-op for those already so, and after :meth:`shutdown`."""
        for service in self.services if services is None else services:
            if self.stopping or self._state.get(service) == serving:
                continue
            self._state[service] = serving
            await self._servicer.set(service, _SERVING if serving else _NOT_SERVING)

    def serving(self, service: str = "") -> bool:
        return not self.stopping and self._state.get(service, False)

    async def shutdown(self) -> None:
        """Every service NOT_SERVING from now on (drain or stop)."""
        if self._stopped_at is None:
            self._stopped_at = asyncio.get_running_loop().time()
        self.stopping = True
        await self._servicer.enter_graceful_shutdown()
        self._servicer.end_watches()

    async def drain(self, drain_s: float) -> None:
        """Wait until ``drain_s`` has passed since :meth:`shutdown` if any client watched this
        server's health (see the module contract); return at once otherwise."""
        if self._stopped_at is None or not self._servicer.watched:
            return
        left = self._stopped_at + drain_s - asyncio.get_running_loop().time()
        if left > 0:
            await asyncio.sleep(left)


async def add_standard_services(
    server: aio.Server, services: Sequence[str], *, serving: bool = True
) -> Health:
    """Add health and reflection to ``server`` (before it starts) for ``services`` (the names
    its other services answer at); they start SERVING unless ``serving`` is False."""
    servicer = _Servicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    health = Health(servicer, services)
    for service in health.services:
        await servicer.set(service, _SERVING)
    if not serving:
        await health.set(False)
    reflection.enable_server_reflection((*services, HEALTH, REFLECTION), server, pool=_wire_pool())
    return health
