"""The gateway: the Open Inference Protocol endpoint of the control plane (a thin adapter).

For each query it decodes the request's facts (SLO, minimum accuracy, zone, client), resolves
the variant and its candidate copies with the pure functions of
:mod:`~meshserve.common.routing.resolve` (first the version: a named version, an alias
and its canary, or ``live``; then the variant among that version's variants: a pinned variant, SLO
switching, :mod:`~meshserve.common.routing.switching`, or the most accurate), admits it
(:class:`~meshserve.controlplane.dataplane.admission.Admission`: bounded queries in flight per
model and per client, beyond which RESOURCE_EXHAUSTED at once with a retry-after hint), and hands
it to the :class:`~meshserve.controlplane.dataplane.forward.Forwarder`, which picks the copy
(the query's zone first: request parameter ``client_zone``, else the gateway's own zone; then
power of two choices on live load), sends it directly or down the node's stream, retries once on
another copy, and wakes a variant scaled to zero. Errors are domain errors
(:mod:`meshserve.common.errors`) that the replica's interceptor maps to gRPC statuses.

Contract of the answers: ServerLive is always true; ServerReady is the replica's readiness;
ModelReady is true when the variant a query naming that version would get has a candidate copy
(false for an unknown model); ModelMetadata describes that variant (its registered tensors, else
those a ready copy reported; UNAVAILABLE while neither is known) and lists the model's versions.
A ModelInfer answer to a query with an SLO (its own ``slo_ms``, else its version's) carries
``meshserve_slo_met``.

Tracing: the ``gateway ModelInfer`` span (SERVER) has a ``gateway route`` child per routing
decision (the variant choice and the copy picked; a retry decides again) and a ``gateway forward``
child (CLIENT) per attempt, whose context is the one the node receives (call metadata or tunnel
frame), so the node's span is a child of the attempt that reached it.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import metrics, trace
from opentelemetry.context import Context

from meshserve.common.errors import InvalidArgument, NotFound, ServicerContext, Unavailable
from meshserve.common.instruments import RequestMetrics
from meshserve.common.params import CLIENT_ZONE, PREFER
from meshserve.common.routing.balance import CopyKey
from meshserve.common.routing.resolve import (
    LiveLoad,
    candidates,
    no_copy,
    serving_variant,
    versions,
)
from meshserve.common.routing.router import Decision, Router
from meshserve.common.streaming import serve_infer_stream
from meshserve.common.tracing import context_from_metadata, server_span
from meshserve.controlplane.dataplane.admission import Admission
from meshserve.controlplane.dataplane.forward import Forwarder, child_span
from meshserve.controlplane.link.hub import Hub
from meshserve.controlplane.observe.events import EventSink
from meshserve.controlplane.placement.scheduler import min_copies
from meshserve.controlplane.snapshot import Snapshot, VariantKey
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2

__all__ = ["Gateway"]

_tracer = trace.get_tracer("meshserve.gateway")
CLIENT_ID_KEY = "x-client-id"
_VERSION = "0.1.0"


def _slo_of(request: inference_pb2.ModelInferRequest) -> tuple[float | None, float | None]:
    """(latency budget in seconds, minimum accuracy) from the request's parameters."""
    out: list[float | None] = []
    for name in ("slo_ms", "min_accuracy"):
        param = request.parameters.get(name)
        if param is None:
            out.append(None)
            continue
        choice = param.WhichOneof("parameter_choice")
        value = getattr(param, choice) if choice else None
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InvalidArgument(f"parameter {name!r} must be a number, got {value!r}") from None
        if not math.isfinite(number) or number < 0 or (name == "slo_ms" and number == 0):
            raise InvalidArgument(f"parameter {name!r} must be a positive number, got {number}")
        out.append(number / 1000.0 if name == "slo_ms" else number)
    return out[0], out[1]


def _zone_of(request: inference_pb2.ModelInferRequest) -> str:
    """The zone the query names (parameter ``client_zone``), or "" when it names none."""
    param = request.parameters.get(CLIENT_ZONE)
    if param is None:
        return ""
    if param.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(f"parameter {CLIENT_ZONE!r} must be a string")
    return param.string_param.strip()


def _client_of(metadata: Any, peer: str) -> str:
    """Who a query counts against for admission: its ``x-client-id`` metadata, else the
    caller's host (the peer address without its port)."""
    for key, value in metadata or ():
        if key == CLIENT_ID_KEY:
            return str(value)[:128]
    host = peer.rsplit(":", 1)[0] if peer else ""
    return host


class Gateway(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        *,
        hub: Hub,
        snapshot: Callable[[], Snapshot],
        channel_options: list[tuple[str, Any]],
        ready: Callable[[], bool],
        events: EventSink | None = None,
        wake: Callable[[VariantKey, bool], Awaitable[None]] | None = None,
        cold_start_max_s: float = 60.0,
        zone: str = "",
        admission: Admission | None = None,
        node_credentials: grpc.ChannelCredentials | None = None,
        stream_check: Callable[[ServicerContext], Callable[[str], None]] | None = None,
    ) -> None:
        """``zone``: this gateway's zone, preferred for queries that name none ("" for none).
        ``admission``: in-flight limits per model and client (default: :class:`Admission`).
        ``node_credentials``: TLS to nodes' direct ports (None: insecure). ``stream_check``:
        authenticates a ModelStreamInfer stream and returns its per-model check (raising the
        refusal; :attr:`meshserve.controlplane.auth.Guard.stream_check`); None: open.
        The rest is the :class:`Forwarder`'s."""
        self._snapshot = snapshot
        self._ready = ready
        self._stream_check = stream_check

        def telemetry(node_id: str, key: VariantKey) -> mesh_pb2.ModelTelemetry | None:
            session = hub.sessions.get(node_id)
            return session.copy_telemetry(key) if session is not None else None

        self.router = Router(linked=hub.sessions, telemetry=telemetry, zone=zone)
        self.forwarder = Forwarder(
            hub=hub,
            router=self.router,
            snapshot=snapshot,
            channel_options=channel_options,
            node_credentials=node_credentials,
            events=events,
            wake=wake,
            cold_start_max_s=cold_start_max_s,
        )
        self._metrics = RequestMetrics(hop="gateway")
        self._slo_misses = metrics.get_meter("meshserve.gateway").create_counter(
            "meshserve.slo_misses", unit="1", description="answers later than the query's SLO"
        )
        self.zone = zone
        self.admission = admission or Admission()

    def notify(self) -> None:
        """The view changed (called by the replica on every snapshot change)."""
        self.forwarder.notify()

    def forget(self, keep: Callable[[CopyKey], bool]) -> None:
        """Drop what is measured of copies ``keep`` rejects (the replica's maintenance)."""
        self.router.forget(keep)

    def live_load(self, model: str) -> LiveLoad:
        """What this gateway measures of ``model``'s candidate copies now, as data (the Admin
        API explains switching from it with the pure functions)."""
        return self.router.live_load(self._snapshot(), model)

    async def close(self) -> None:
        await self.forwarder.close()

    # -- health and metadata ----------------------------------------------------------------

    async def ServerLive(
        self, request: inference_pb2.ServerLiveRequest, context: ServicerContext
    ) -> inference_pb2.ServerLiveResponse:
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: inference_pb2.ServerReadyRequest, context: ServicerContext
    ) -> inference_pb2.ServerReadyResponse:
        return inference_pb2.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(
        self, request: inference_pb2.ServerMetadataRequest, context: ServicerContext
    ) -> inference_pb2.ServerMetadataResponse:
        return inference_pb2.ServerMetadataResponse(name="meshserve", version=_VERSION)

    async def ModelReady(
        self, request: inference_pb2.ModelReadyRequest, context: ServicerContext
    ) -> inference_pb2.ModelReadyResponse:
        snapshot, linked = self._snapshot(), self.router.linked
        try:
            spec = serving_variant(snapshot, request.name, request.version, linked)
        except NotFound:
            return inference_pb2.ModelReadyResponse(ready=False)
        return inference_pb2.ModelReadyResponse(ready=bool(candidates(snapshot, spec, linked)))

    async def ModelMetadata(
        self, request: inference_pb2.ModelMetadataRequest, context: ServicerContext
    ) -> inference_pb2.ModelMetadataResponse:
        snapshot = self._snapshot()
        spec = serving_variant(snapshot, request.name, request.version, self.router.linked)
        inputs, outputs = list(spec.inputs), list(spec.outputs)
        if not inputs:
            for node in snapshot.ready_nodes((spec.name, spec.variant)):
                status = node.copies[(spec.name, spec.variant)]
                inputs, outputs = list(status.inputs), list(status.outputs)
                break
        if not inputs:
            raise Unavailable(f"model {spec.name!r} has no ready copy yet; metadata unknown")
        T = inference_pb2.ModelMetadataResponse.TensorMetadata
        return inference_pb2.ModelMetadataResponse(
            name=spec.name,
            versions=list(versions(snapshot, spec.name)),
            platform="onnxruntime_onnx",
            inputs=[T(name=t.name, datatype=t.datatype, shape=t.shape) for t in inputs],
            outputs=[T(name=t.name, datatype=t.datatype, shape=t.shape) for t in outputs],
        )

    # -- inference ---------------------------------------------------------------------------

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[inference_pb2.ModelInferRequest],
        context: ServicerContext,
    ) -> None:
        """Each request of the stream is routed like a ModelInfer; answers in completion order."""
        metadata = context.invocation_metadata()
        parent = context_from_metadata(metadata)  # type: ignore[arg-type]
        client = _client_of(metadata, context.peer())
        allow = None if self._stream_check is None else self._stream_check(context)

        async def infer(
            request: inference_pb2.ModelInferRequest,
        ) -> inference_pb2.ModelInferResponse:
            if allow is not None:  # API keys: this request's model must be the tenant's
                name = getattr(request, "model_name", None)  # None: malformed, refused below
                if name is not None:
                    allow(name)
            return await self._route(request, parent, None, client)

        await serve_infer_stream(request_iterator, infer, context.write)

    async def ModelInfer(
        self, request: inference_pb2.ModelInferRequest, context: ServicerContext
    ) -> inference_pb2.ModelInferResponse:
        metadata = context.invocation_metadata()
        parent = context_from_metadata(metadata)  # type: ignore[arg-type]
        remaining = context.time_remaining()
        client = _client_of(metadata, context.peer())
        return await self._metrics.measure(self._route(request, parent, remaining, client), request)

    async def _route(
        self,
        request: inference_pb2.ModelInferRequest,
        parent: Context,
        remaining: float | None,
        client: str = "",
    ) -> inference_pb2.ModelInferResponse:
        with server_span(
            _tracer, "gateway ModelInfer", parent, {"meshserve.model": request.model_name}
        ) as span:
            started = time.monotonic()
            deadline = started + remaining if remaining is not None else None
            snapshot = self._snapshot()
            slo_s, min_accuracy = _slo_of(request)
            zone = _zone_of(request) or self.zone
            if zone:
                span.set_attribute("meshserve.client_zone", zone)
            tried: set[str] = set()
            forwarder = self.forwarder
            with child_span(span, "gateway route") as route:
                decision = self._decide(request, snapshot, slo_s, min_accuracy, span)
                spec, reason, predicted_s, slo_s = (
                    decision.spec,
                    decision.reason,
                    decision.predicted_s,
                    decision.slo_s,
                )
                request.model_version = spec.variant
                span.set_attribute("meshserve.variant", spec.variant)
                if not candidates(snapshot, spec, self.router.linked) and min_copies(spec) == 0:
                    snapshot = await forwarder.cold_start(spec, deadline, span)
                node = forwarder.select(snapshot, spec, zone, tried, route, reason, predicted_s)
            if node is None:
                raise no_copy(snapshot, spec, self.router.linked)
            copies = snapshot.ready_count((spec.name, spec.variant))
            ticket = self.admission.admit(spec.name, copies, client)
            try:
                response = await forwarder.attempts(
                    request, spec, snapshot, node, zone, tried, deadline, span, copies > 1
                )
            except BaseException:
                ticket.release(ok=False)
                raise
            ticket.release()
            if slo_s is not None:
                met = time.monotonic() - started <= slo_s
                response.parameters["meshserve_slo_met"].bool_param = met
                span.set_attribute("meshserve.slo_met", met)
                if not met:
                    self._slo_misses.add(1, {"model": spec.name, "variant": spec.variant})
            return response

    def _decide(
        self,
        request: inference_pb2.ModelInferRequest,
        snapshot: Snapshot,
        slo_s: float | None,
        min_accuracy: float | None,
        span: trace.Span,
    ) -> Decision:
        """The router's decision for a query (:meth:`Router.decide`), told to the query's span;
        a switched query names the better variants whose cached answer the node may return."""
        decision = self.router.decide(
            snapshot, request.model_name, request.model_version, request.id, slo_s, min_accuracy
        )
        if decision.alias:
            span.set_attribute("meshserve.alias", decision.alias)
        span.set_attribute("meshserve.version", decision.version)
        if decision.prefer:
            request.parameters[PREFER].string_param = decision.prefer
        if decision.switch_reason:
            span.set_attribute("meshserve.switch_reason", decision.switch_reason)
            if decision.predicted_s != math.inf:
                span.set_attribute("meshserve.predicted_ms", round(decision.predicted_s * 1000, 3))
            if decision.slo_s is not None:
                span.set_attribute("meshserve.slo_ms", decision.slo_s * 1000)
        return decision
