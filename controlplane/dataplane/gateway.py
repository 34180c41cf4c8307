"""The gateway: the Open Inference Protocol endpoint of the control plane (a thin adapter).

For each query it decodes the request's facts (SLO, minimum accuracy, zone, client), resolves
the variant and its candidate copies with the pure functions of
:mod:`~meshserve.common.routing.resolve` (first the version: a named version, an alias
and its canary, or ``live``; then the variant among that version's variants: a pinned variant, SLO
switching, :mod:`~meshserve.common.routing.switching`, or the most accurate), picks
the copy (the query's zone first: request parameter ``client_zone``, else the gateway's own zone;
then power of two choices on live load), admits it
(:class:`~meshserve.controlplane.dataplane.admission.Admission`: bounded queries in flight per
model and per client, and a query whose predicted completion on every copy misses its deadline
is shed; beyond either, RESOURCE_EXHAUSTED at once with a retry-after hint), and hands it to the
:class:`~meshserve.controlplane.dataplane.forward.Forwarder`, which sends it directly (a
multiplexed stream per node) or down the node's stream, retries once on another copy, and wakes
a variant scaled to zero. Errors are domain errors (:mod:`meshserve.common.errors`) that the
server's wrapper maps to gRPC statuses.

What a gateway is attached to comes in as seams, so the same class serves a replica (its hub's
node streams: ``linked``, ``telemetry``, ``tunnel``; its etcd wake key) and a standalone gateway
(the routing feed's view and load; no node streams; a ``fallback`` to a replica's gateway for a
variant with no direct copy).

Shedding by predicted wait: with a deadline, a query goes to a copy whose predicted completion
(:meth:`~meshserve.common.routing.router.Router.predicted_s`: the copy's latency profile x its
queue, this router's in-flight count and the node's reported one, over its parallelism) fits
within 0.75 of the time left (the node's own rule); when the copy picked does not, the others
are tried; when none does, RESOURCE_EXHAUSTED with the wait beyond the budget as retry-after.

Bytes pass through: registered with :func:`add_gateway_to_server`, ModelInfer receives the
request's bytes with its message (:class:`~meshserve.controlplane.dataplane.forward.Query`) and
returns the node's answer bytes unparsed (``meshserve_slo_met`` appended as the bytes of a
response holding only that parameter: protobuf merges concatenated messages).

Contract of the answers: ServerLive is always true; ServerReady is the replica's readiness;
ModelReady is true when the variant a query naming that version would get has a candidate copy
(false for an unknown model); ModelMetadata describes that variant (its registered tensors, else
those a ready copy reported; UNAVAILABLE while neither is known) and lists the model's versions.
A ModelInfer answer to a query with an SLO (its own ``slo_ms``, else its version's) carries
``meshserve_slo_met``.
Triton's ModelConfig and RepositoryIndex answer from the same view
(:mod:`~meshserve.controlplane.dataplane.repository`).

Tracing: the ``gateway ModelInfer`` span (SERVER) has a ``gateway route`` child per routing
decision (the variant choice and the copy picked; a retry decides again) and a ``gateway forward``
child (CLIENT) per attempt, whose context is the one the node receives (stream frame, call
metadata or tunnel frame), so the node's span is a child of the attempt that reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Sequence
from typing import Any

import grpc
from opentelemetry import metrics, trace
from opentelemetry.context import Context

from meshserve.common.errors import (
    InvalidArgument,
    NotFound,
    ServicerContext,
    StatusError,
    Unavailable,
)
from meshserve.common.instruments import Labels, RequestMetrics
from meshserve.common.params import CLIENT_ZONE
from meshserve.common.routing.balance import CopyKey
from meshserve.common.routing.resolve import (
    LiveLoad,
    candidates,
    no_copy,
    serving_variant,
    versions,
)
from meshserve.common.routing.router import Decision, Router, Telemetry
from meshserve.common.streaming import serve_infer_stream
from meshserve.common.tenancy import bind_caller
from meshserve.common.tracing import context_from_metadata, server_span
from meshserve.controlplane.dataplane import repository
from meshserve.controlplane.dataplane.admission import HEADROOM, Admission
from meshserve.controlplane.dataplane.forward import (
    CLIENT_ID_KEY,
    Answer,
    Fallback,
    Forwarder,
    Query,
    Tunnel,
    child_span,
)
from meshserve.controlplane.observe.events import EventSink
from meshserve.controlplane.placement.scheduler import min_copies
from meshserve.controlplane.snapshot import NodeView, Snapshot, VariantKey
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2

__all__ = ["Gateway", "add_gateway_to_server"]

_tracer = trace.get_tracer("meshserve.gateway")
_VERSION = "0.1.0"
_SERVICE = "inference.GRPCInferenceService"

#: What an admitted query ending so says of shedding: it let through one too many (the deadline
#: passed on the way, or the node refused it as too late or its copy full).
_OVER_ADMITTED = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED})


def _slo_met_bytes(met: bool) -> bytes:
    """A response holding only ``meshserve_slo_met``: appended to an answer's bytes, it sets
    that parameter (protobuf merges concatenated messages; a later map entry wins)."""
    response = inference_pb2.ModelInferResponse()
    response.parameters["meshserve_slo_met"].bool_param = met
    return response.SerializeToString()


_SLO_MET = {True: _slo_met_bytes(True), False: _slo_met_bytes(False)}


def _serialize_answer(answer: Answer) -> bytes:
    return answer if isinstance(answer, bytes) else answer.SerializeToString()


def add_gateway_to_server(servicer: Any, server: Any) -> None:
    """Register ``servicer`` (a :class:`Gateway`, wrapped as the caller likes: auth checks,
    :func:`~meshserve.common.errors.map_errors`) as ``inference.GRPCInferenceService`` on
    ``server`` (an ``aio.Server``, or :func:`~meshserve.common.errors.tolerant_decoding` of
    one), as the generated ``add_GRPCInferenceServiceServicer_to_server`` does, except that
    ModelInfer receives a :class:`~meshserve.controlplane.dataplane.forward.Query` (the
    request's bytes with their message) and may answer bytes, sent as they are."""
    pb = inference_pb2

    def unary(behavior: Any, request: Any, response: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )

    handlers = {
        "ServerLive": unary(servicer.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": unary(servicer.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": unary(servicer.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": unary(
            servicer.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
        ),
        "ModelMetadata": unary(
            servicer.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
        ),
        "ModelConfig": unary(servicer.ModelConfig, pb.ModelConfigRequest, pb.ModelConfigResponse),
        "RepositoryIndex": unary(
            servicer.RepositoryIndex, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse
        ),
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfer,
            request_deserializer=Query.parse,
            response_serializer=_serialize_answer,
        ),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            servicer.ModelStreamInfer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_registered_method_handlers(_SERVICE, handlers)


class LoopLag:
    """How late this event loop runs what is ready now: an EWMA of how much a periodic sleep
    oversleeps (sampled every ``interval_s`` once :meth:`seconds` is first asked, on the loop).
    A saturated gateway delays every answer on its way back by about this much: time the
    copies' predictions do not see."""

    def __init__(self, interval_s: float = 0.025, alpha: float = 0.2) -> None:
        self._interval_s = interval_s
        self._alpha = alpha
        self._lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def seconds(self) -> float:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sample(), name="loop lag")
        return self._lag_s

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        interval, alpha = self._interval_s, self._alpha
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            late = max(0.0, loop.time() - before - interval)
            self._lag_s += alpha * (late - self._lag_s)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


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
    """Who a query counts against for admission without API keys: its ``x-client-id``
    metadata, else the caller's host (the peer address without its port). The caller chooses
    its ``x-client-id``: without API keys the per-client limit is a courtesy (a caller rotating
    ids is not held to it); with them, the tenant is the client (:meth:`Gateway._client`)."""
    for key, value in metadata or ():
        if key == CLIENT_ID_KEY:
            return str(value)[:128]
    host = peer.rsplit(":", 1)[0] if peer else ""
    return host


class Gateway(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        *,
        snapshot: Callable[[], Snapshot],
        channel_options: list[tuple[str, Any]],
        ready: Callable[[], bool],
        linked: Container[str] = frozenset(),
        telemetry: Telemetry | None = None,
        tunnel: Tunnel | None = None,
        fallback: Fallback | None = None,
        events: EventSink | None = None,
        wake: Callable[[VariantKey, bool], Awaitable[None]] | None = None,
        cold_start_max_s: float = 60.0,
        zone: str = "",
        admission: Admission | None = None,
        node_credentials: grpc.ChannelCredentials | None = None,
        stream_check: Callable[[ServicerContext], Callable[[str], None]] | None = None,
        mux: bool = True,
        max_message_bytes: int = 64 << 20,
        node_metadata: Sequence[tuple[str, str]] = (),
        tenant_of: Callable[[ServicerContext], str] | None = None,
    ) -> None:
        """``snapshot``: the view routed over (a replica's, or the routing feed's).
        ``linked``: the nodes ``tunnel`` reaches (a replica's node streams; empty without).
        ``telemetry``: the live load nodes report (None: none heard). ``tunnel``: sends a query
        down a node's stream (None: no node streams). ``fallback``: where a query goes whose
        variant has no candidate here (a standalone gateway's replica; None: nowhere).
        ``zone``: this gateway's zone, preferred for queries that name none ("" for none).
        ``admission``: in-flight limits per model and client, and shedding by predicted wait
        (default: :class:`Admission`). ``node_credentials``: to nodes' direct ports (None:
        insecure). ``stream_check``: authenticates a ModelStreamInfer stream and returns its
        per-model check (raising the refusal;
        :attr:`meshserve.controlplane.auth.Guard.stream_check`); None: open. ``mux``: direct
        queries over multiplexed streams (False: unary calls). ``tenant_of``: the caller's
        API-key tenant (:meth:`meshserve.controlplane.auth.Guard.tenant`), which admission
        counts per-client limits against (None: no API keys; ``x-client-id``, else the peer
        host). The rest is the :class:`Forwarder`'s."""
        self._snapshot = snapshot
        self._ready = ready
        self._stream_check = stream_check
        self._tenant_of = tenant_of
        if telemetry is None:
            self.router = Router(linked=linked, zone=zone)
        else:
            self.router = Router(linked=linked, telemetry=telemetry, zone=zone)
        self.forwarder = Forwarder(
            router=self.router,
            snapshot=snapshot,
            channel_options=channel_options,
            node_credentials=node_credentials,
            events=events,
            wake=wake,
            cold_start_max_s=cold_start_max_s,
            tunnel=tunnel,
            fallback=fallback,
            mux=mux,
            max_message_bytes=max_message_bytes,
            node_metadata=node_metadata,
        )
        self._metrics = RequestMetrics(hop="gateway")
        self._slo_misses = metrics.get_meter("meshserve.gateway").create_counter(
            "meshserve.slo_misses", unit="1", description="answers later than the query's SLO"
        )
        #: model -> [met, total] of the answers with an SLO (registered models only; the map
        #: shows the hit rate from it)
        self.slo_counts: dict[str, list[int]] = {}
        self.zone = zone
        self.admission = admission or Admission()
        self.lag = LoopLag()

    def _client(self, context: ServicerContext) -> str:
        """Who a query counts against for admission: its API-key tenant when keys are on (a
        caller cannot choose it), else :func:`_client_of`."""
        if self._tenant_of is not None:
            return f"tenant {self._tenant_of(context)}"
        return _client_of(context.invocation_metadata(), context.peer())

    def notify(self) -> None:
        """The view changed (called by the replica on every snapshot change)."""
        self.forwarder.notify()

    def forget(self, keep: Callable[[CopyKey], bool]) -> None:
        """Drop what is measured of copies ``keep`` rejects, and close the streams to nodes no
        longer in the view (the replica's maintenance; a standalone gateway's feed changes)."""
        self.router.forget(keep)
        try:
            nodes = self._snapshot().nodes.values()
        except StatusError:  # no view yet
            return
        self.forwarder.prune({node.direct_address for node in nodes if node.direct_address})

    def live_load(self, model: str) -> LiveLoad:
        """What this gateway measures of ``model``'s candidate copies now, as data (the Admin
        API explains switching from it with the pure functions)."""
        return self.router.live_load(self._snapshot(), model)

    async def close(self) -> None:
        await self.lag.close()
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
        ready = bool(candidates(snapshot, spec, linked)) or (
            self.forwarder.fallback is not None
            and snapshot.ready_count((spec.name, spec.variant)) > 0
        )
        return inference_pb2.ModelReadyResponse(ready=ready)

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

    # -- Triton's model configuration and repository extensions (repository.py) -------------

    async def ModelConfig(
        self, request: inference_pb2.ModelConfigRequest, context: ServicerContext
    ) -> inference_pb2.ModelConfigResponse:
        return repository.config(self._snapshot(), request, self.router.linked)

    async def RepositoryIndex(
        self, request: inference_pb2.RepositoryIndexRequest, context: ServicerContext
    ) -> inference_pb2.RepositoryIndexResponse:
        fallback = self.forwarder.fallback is not None
        return repository.index(self._snapshot(), request, self.router.linked, fallback)

    # -- inference ---------------------------------------------------------------------------

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[inference_pb2.ModelInferRequest],
        context: ServicerContext,
    ) -> None:
        """Each request of the stream is routed like a ModelInfer; answers in completion order."""
        metadata = context.invocation_metadata()
        parent = context_from_metadata(metadata)  # type: ignore[arg-type]
        client = self._client(context)
        bind_caller(metadata)  # whose queries these are, to the nodes (feedback)
        allow = None if self._stream_check is None else self._stream_check(context)

        async def infer(
            request: inference_pb2.ModelInferRequest,
        ) -> inference_pb2.ModelInferResponse:
            if allow is not None:  # API keys: this request's model must be the tenant's
                name = getattr(request, "model_name", None)  # None: malformed, refused below
                if name is not None:
                    allow(name)
            answer = await self._route(Query(request), parent, None, client)
            if isinstance(answer, bytes):
                return inference_pb2.ModelInferResponse.FromString(answer)
            return answer

        await serve_infer_stream(request_iterator, infer, context.write)

    async def ModelInfer(
        self, request: Query | inference_pb2.ModelInferRequest, context: ServicerContext
    ) -> Answer:
        """A query (its bytes with their message, registered by :func:`add_gateway_to_server`;
        a bare message otherwise); the answer as bytes where they passed through."""
        query = request if isinstance(request, Query) else Query(request)
        metadata = context.invocation_metadata()
        parent = context_from_metadata(metadata)  # type: ignore[arg-type]
        remaining = context.time_remaining()
        client = self._client(context)
        bind_caller(metadata)  # whose query this is, to the node (feedback)
        return await self._route(query, parent, remaining, client, measured=True)

    async def _route(
        self,
        query: Query,
        parent: Context,
        remaining: float | None,
        client: str = "",
        measured: bool = False,
    ) -> Answer:
        request = query.message
        with server_span(
            _tracer, "gateway ModelInfer", parent, {"meshserve.model": request.model_name}
        ) as span:
            started = time.monotonic()
            deadline = started + remaining if remaining is not None else None
            served = Labels()  # what the metrics record: only names the view resolved
            try:
                answer = await self._serve(query, span, started, deadline, client, served)
            except StatusError as exc:
                if measured:
                    code: int = exc.code.value[0]
                    served.node = ""
                    self._metrics.record(served, code, time.monotonic() - started)
                raise
            if measured:
                self._metrics.record(served, 0, time.monotonic() - started)
            return answer

    async def _serve(
        self,
        query: Query,
        span: trace.Span,
        started: float,
        deadline: float | None,
        client: str,
        served: Labels,
    ) -> Answer:
        request = query.message
        snapshot = self._snapshot()
        slo_s, min_accuracy = _slo_of(request)
        zone = _zone_of(request) or self.zone
        if zone:
            span.set_attribute("meshserve.client_zone", zone)
        tried: set[str] = set()
        forwarder = self.forwarder
        relay = False
        node: NodeView | None = None
        with child_span(span, "gateway route") as route:
            decision = self._decide(request, snapshot, slo_s, min_accuracy, span)
            spec, slo_s = decision.spec, decision.slo_s
            served.model, served.variant = spec.name, spec.variant
            span.set_attribute("meshserve.variant", spec.variant)
            if not self.router.candidates(snapshot, spec):
                if forwarder.fallback is not None:
                    relay = True  # no copy reachable from here: a replica's gateway has one
                    if route.is_recording():
                        route.set_attributes(
                            {
                                "meshserve.candidates": 0,
                                "meshserve.node": "",
                                "meshserve.variant": spec.variant,
                                "meshserve.route_reason": "no direct copy: via a replica",
                            }
                        )
                elif min_copies(spec) == 0:
                    snapshot = await forwarder.cold_start(spec, deadline, span)
            if not relay:
                node = forwarder.select(
                    snapshot, spec, zone, tried, route, decision.reason, decision.predicted_s
                )
                if node is not None and deadline is not None and self.admission.shed_late:
                    node = self._fit(snapshot, spec, zone, tried, node, deadline, route)
        if node is None and not relay:
            raise no_copy(snapshot, spec, self.router.linked)
        copies = snapshot.ready_count((spec.name, spec.variant))
        admission = self.admission
        ticket = admission.admit(spec.name, copies, client)
        judged = deadline is not None and admission.shed_late
        try:
            if node is None:
                answer: Answer = await forwarder.relay(query, spec, deadline, span, client)
            else:
                answer, served.node = await forwarder.attempts(
                    query,
                    spec,
                    snapshot,
                    node,
                    zone,
                    tried,
                    deadline,
                    span,
                    copies > 1,
                    decision.prefer,
                )
        except StatusError as exc:
            ticket.release(ok=False)
            if judged and exc.code in _OVER_ADMITTED:
                admission.settled(spec.name, missed=True)
            raise
        except asyncio.CancelledError:
            ticket.release(ok=False)
            if judged:  # the caller gave up late in the budget: its deadline passed (its clock)
                assert deadline is not None
                now = time.monotonic()
                admission.settled(spec.name, missed=now - started >= 0.5 * (deadline - started))
            raise
        except BaseException:
            ticket.release(ok=False)
            raise
        ticket.release()
        if judged:
            assert deadline is not None
            admission.settled(spec.name, missed=time.monotonic() > deadline)
        if slo_s is not None:
            met = time.monotonic() - started <= slo_s
            tally = self.slo_counts.setdefault(spec.name, [0, 0])
            tally[0] += met
            tally[1] += 1
            if isinstance(answer, bytes):
                answer += _SLO_MET[met]
            else:
                answer.parameters["meshserve_slo_met"].bool_param = met
            span.set_attribute("meshserve.slo_met", met)
            if not met:
                self._slo_misses.add(1, {"model": spec.name, "variant": spec.variant})
        return answer

    def _fit(
        self,
        snapshot: Snapshot,
        spec: mesh_pb2.ModelSpec,
        zone: str,
        tried: set[str],
        node: NodeView,
        deadline: float,
        route: trace.Span,
    ) -> NodeView:
        """``node`` when its predicted completion fits the query's deadline (``HEADROOM`` of
        the time left), else another copy whose does; RESOURCE_EXHAUSTED when none does, with
        the wait beyond the budget as the retry-after hint. A copy without a prediction fits."""
        router = self.router
        left = deadline - time.monotonic()
        # this loop's delay out and back, and what outcomes taught (Admission.margin)
        budget = HEADROOM * left * self.admission.margin(spec.name) - 2 * self.lag.seconds()
        best = router.predicted_s(node, spec)
        if best <= budget or not math.isfinite(best):  # no prediction (inf) never sheds
            return node
        want = zone or self.zone
        others = sorted(  # the query's zone first, then the copy predicted to answer first
            (
                bool(want) and n.labels.get("zone") != want,
                router.predicted_s(n, spec),
                i,
                n,
            )
            for i, n in enumerate(router.candidates(snapshot, spec))
            if n.node_id not in tried
        )
        for _, predicted, _, other in others:
            if predicted <= budget or not math.isfinite(predicted):
                tried.discard(node.node_id)  # skipped, not tried: a retry may still go there
                tried.add(other.node_id)
                if route.is_recording():
                    route.set_attribute("meshserve.node", other.node_id)
                    route.set_attribute("meshserve.skipped_late", node.node_id)
                return other
            best = min(best, predicted)
        if route.is_recording():
            route.set_attribute("meshserve.shed", True)
            route.set_attribute("meshserve.predicted_ms", round(best * 1000, 3))
        raise self.admission.shed(spec.name, best, left)

    def _decide(
        self,
        request: inference_pb2.ModelInferRequest,
        snapshot: Snapshot,
        slo_s: float | None,
        min_accuracy: float | None,
        span: trace.Span,
    ) -> Decision:
        """The router's decision for a query (:meth:`Router.decide`), told to the query's span;
        a switched query names the better variants whose cached answer the node may return
        (``Decision.prefer``, sent with the query)."""
        decision = self.router.decide(
            snapshot, request.model_name, request.model_version, request.id, slo_s, min_accuracy
        )
        if decision.alias:
            span.set_attribute("meshserve.alias", decision.alias)
        span.set_attribute("meshserve.version", decision.version)
        if decision.switch_reason:
            span.set_attribute("meshserve.switch_reason", decision.switch_reason)
            if decision.predicted_s != math.inf:
                span.set_attribute("meshserve.predicted_ms", round(decision.predicted_s * 1000, 3))
            if decision.slo_s is not None:
                span.set_attribute("meshserve.slo_ms", decision.slo_s * 1000)
        return decision
