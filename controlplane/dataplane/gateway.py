"""The gateway: the Open Inference Protocol endpoint of the control plane.

Each query is routed to a READY copy of the requested variant: directly to the node's own OIP
port when it has one, else down the node's stream held by this replica (the tunnel). Among
reachable copies the gateway picks by power of two choices on live load (its own in-flight count
and the node's reported queue depth, weighted by observed latency; see
:mod:`meshserve.controlplane.dataplane.routing`).
Copies in the query's zone (request parameter ``client_zone``, else the gateway's own zone) are
picked among first (see :mod:`meshserve.controlplane.dataplane.locality`). An UNAVAILABLE or
RESOURCE_EXHAUSTED
answer, or a first attempt that stalled (a grey failure: no answer within 20 x the copy's
observed latency, at least 0.5 s, when the deadline leaves room for two), is retried once on
another copy (in any zone; inference is idempotent), never past the caller's deadline. Before
any of it, :class:`~meshserve.controlplane.dataplane.admission.Admission` bounds the queries in
flight per model and
per client: beyond, RESOURCE_EXHAUSTED at once with a retry-after hint. A query
for a variant scaled to zero (autoscaling with ``min_copies: 0``) asks the leader for a copy (an
etcd "wake" key) and waits for it to be ready, up to its deadline (or ``cold_start_max_s``
without one); the wait is the measured cold start (span attribute, event).

Tracing: the ``gateway ModelInfer`` span (SERVER) has a ``gateway route`` child per routing
decision (the variant choice and the copy picked; a retry decides again) and a ``gateway forward``
child (CLIENT) per attempt, whose context is the one the node receives (call metadata or tunnel
frame), so the node's span is a child of the attempt that reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from opentelemetry import metrics, trace
from opentelemetry.context import Context

from meshserve.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServicerContext,
    StatusError,
    Unavailable,
    from_code,
)
from meshserve.common.instruments import RequestMetrics
from meshserve.common.params import CLIENT_ZONE, PREFER
from meshserve.common.streaming import serve_infer_stream
from meshserve.common.tracing import (
    context_from_metadata,
    inject_map,
    metadata_with_context,
    server_span,
)
from meshserve.controlplane.dataplane.admission import Admission
from meshserve.controlplane.dataplane.locality import prefer_local
from meshserve.controlplane.dataplane.rollout import (
    DEFAULT_ALIAS,
    Route,
    VersionState,
    alias_for,
    alias_status,
    canary_draw,
    resolve,
    versions_of,
)
from meshserve.controlplane.dataplane.routing import Balancer, CopyKey
from meshserve.controlplane.dataplane.switching import (
    Calibration,
    Choice,
    CopyLoad,
    Switcher,
    VariantOption,
    predict_seconds,
)
from meshserve.controlplane.link.hub import Hub
from meshserve.controlplane.observe.events import EventSink
from meshserve.controlplane.placement.scheduler import min_copies
from meshserve.controlplane.snapshot import NodeView, Snapshot, VariantKey
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2

__all__ = ["Gateway"]

_tracer = trace.get_tracer("meshserve.gateway")
CLIENT_ID_KEY = "x-client-id"
_VERSION = "0.1.0"


def _default_slo(variants: list[mesh_pb2.ModelSpec]) -> float | None:
    if not variants:
        return None
    best = max(variants, key=lambda s: (s.accuracy, s.variant))
    return best.slo_ms / 1000.0 if best.slo_ms > 0 else None


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


def _child(
    span: trace.Span, name: str, kind: trace.SpanKind = trace.SpanKind.INTERNAL
) -> contextlib.AbstractContextManager[trace.Span]:
    """A current child span of ``span`` (the query's); ``span`` itself when it does not record
    (not sampled, or no tracing configured): a no-op span still costs microseconds per query,
    and the context sent on is the same either way."""
    if span.is_recording():
        return _tracer.start_as_current_span(name, kind=kind)
    return contextlib.nullcontext(span)


#: A first attempt with another copy to fall back on gets at most this factor of the copy's
#: observed latency (and at least _STUCK_MIN_S), when the caller's deadline leaves room for two.
_STUCK_FACTOR = 20.0
_STUCK_MIN_S = 0.5

#: Answers retried once on another copy (inference is idempotent): the copy is gone, or full.
_RETRIABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

_COPY_FAULTS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)


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
        refusal; :attr:`meshserve.controlplane.auth.Guard.stream_check`); None: open."""
        self._node_credentials = node_credentials
        self._stream_check = stream_check
        self._hub = hub
        self._snapshot = snapshot
        self._channel_options = channel_options
        self._ready = ready
        self._channels: dict[
            str, tuple[aio.Channel, inference_pb2_grpc.GRPCInferenceServiceStub]
        ] = {}
        self.balancer = Balancer()
        self._switcher = Switcher()
        self._metrics = RequestMetrics(hop="gateway")
        self.calibration = Calibration()
        self._switched: set[str] = set()  # models queried with an SLO / minimum accuracy
        self._slo_misses = metrics.get_meter("meshserve.gateway").create_counter(
            "meshserve.slo_misses", unit="1", description="answers later than the query's SLO"
        )
        self._events = events
        self._wake = wake
        self._cold_start_max_s = cold_start_max_s
        self.zone = zone
        self._changed = asyncio.Event()
        self.admission = admission or Admission()

    def notify(self) -> None:
        """The view changed (called by the replica on every snapshot change)."""
        self._changed.set()
        self._changed = asyncio.Event()

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
        snapshot = self._snapshot()
        try:
            spec = self._variant(snapshot, request.name, request.version)
        except NotFound:
            return inference_pb2.ModelReadyResponse(ready=False)
        return inference_pb2.ModelReadyResponse(ready=bool(self._candidates(snapshot, spec)))

    async def ModelMetadata(
        self, request: inference_pb2.ModelMetadataRequest, context: ServicerContext
    ) -> inference_pb2.ModelMetadataResponse:
        snapshot = self._snapshot()
        spec = self._variant(snapshot, request.name, request.version)
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
            versions=sorted(s.variant for s in snapshot.variants(spec.name)),
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
            if slo_s is None:  # the model's default SLO (that of its most accurate variant)
                slo_s = _default_slo(snapshot.variants(request.model_name))
            tried: set[str] = set()
            with _child(span, "gateway route") as route:
                # A version or alias named, or the model's `live` alias: no switching.
                pinned = (request.model_name, DEFAULT_ALIAS) in snapshot.aliases
                if request.model_version or pinned or (slo_s is None and min_accuracy is None):
                    spec, followed = self._resolve(
                        snapshot,
                        request.model_name,
                        request.model_version,
                        canary_draw(request.id),
                    )
                    reason, predicted_s = "p2c", math.inf
                    if followed is not None:
                        reason = f"alias {followed.reason}"
                        span.set_attribute("meshserve.alias", followed.alias)
                else:
                    choice = self._switch(
                        request, snapshot, request.model_name, slo_s, min_accuracy, span
                    )
                    spec, reason = choice.spec, f"switch: {choice.reason}"
                    predicted_s = choice.predicted_s
                request.model_version = spec.variant
                span.set_attribute("meshserve.variant", spec.variant)
                if not self._candidates(snapshot, spec) and min_copies(spec) == 0:
                    snapshot = await self._cold_start(spec, deadline, span)
                node = self._select(snapshot, spec, zone, tried, route, reason, predicted_s)
            if node is None:
                raise self._no_copy(snapshot, spec)
            copies = snapshot.ready_count((spec.name, spec.variant))
            ticket = self.admission.admit(spec.name, copies, client)
            try:
                response = await self._attempts(
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

    async def _attempts(
        self,
        request: inference_pb2.ModelInferRequest,
        spec: mesh_pb2.ModelSpec,
        snapshot: Snapshot,
        node: NodeView,
        zone: str,
        tried: set[str],
        deadline: float | None,
        span: trace.Span,
        fallback: bool,
    ) -> inference_pb2.ModelInferResponse:
        """Forward to ``node``; an UNAVAILABLE or RESOURCE_EXHAUSTED answer, or a first attempt
        that stalled, is retried once on another copy (when there is none, the first error
        stands: a full copy's RESOURCE_EXHAUSTED keeps its retry-after hint). ``fallback``:
        another READY copy exists, so a stalled first attempt is cut short."""
        failure: StatusError | None = None
        for attempt in (1, 2):
            if attempt == 2:
                with _child(span, "gateway route") as route:
                    other = self._select(snapshot, spec, zone, tried, route, "retry")
                if other is None:
                    assert failure is not None
                    if failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise failure
                    break
                node = other
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                break
            limit = timeout
            if attempt == 1 and fallback:
                # A grey failure (a frozen or stalled node) answers nothing rather than an
                # error: give the first copy a bounded share, so another can still answer.
                stuck = max(
                    _STUCK_MIN_S,
                    _STUCK_FACTOR * self.balancer.observed((node.node_id, spec.name, spec.variant)),
                )
                if timeout is None or timeout > 2 * stuck:
                    limit = stuck
            try:
                response = await self._forward(node, spec, request, limit, span, attempt)
            except StatusError as exc:
                stalled = exc.code == grpc.StatusCode.DEADLINE_EXCEEDED and limit != timeout
                if (exc.code not in _RETRIABLE and not stalled) or attempt == 2:
                    raise
                failure = exc
                span.add_event("retry", {"meshserve.node": node.node_id, "reason": exc.message})
                if self._events is not None and exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self._events.record(
                        "reroute",
                        model=spec.name,
                        variant=spec.variant,
                        node_id=node.node_id,
                        message=f"retried on another copy: {exc.message}",
                    )
                snapshot = self._snapshot()
                continue
            span.set_attribute("meshserve.node", node.node_id)
            return response
        raise Unavailable(
            f"model {spec.name!r}: no copy answered (tried {', '.join(sorted(tried))})"
        )

    async def _cold_start(
        self, spec: mesh_pb2.ModelSpec, deadline: float | None, span: trace.Span
    ) -> Snapshot:
        """Wake a scaled-to-zero variant and wait for a ready copy; the snapshot that has one."""
        key = (spec.name, spec.variant)
        started = time.monotonic()
        limit = deadline if deadline is not None else started + self._cold_start_max_s
        if self._wake is None:
            raise Unavailable(f"model {spec.name!r} variant {spec.variant!r} is scaled to zero")
        await self._wake(key, True)
        try:
            while True:
                snapshot = self._snapshot()
                if self._candidates(snapshot, spec):
                    waited = time.monotonic() - started
                    span.set_attribute("meshserve.cold_start_ms", round(waited * 1000, 1))
                    if self._events is not None:
                        self._events.record(
                            "scale",
                            model=spec.name,
                            variant=spec.variant,
                            message=f"cold start from zero: first query waited {waited:.2f} s",
                        )
                    return snapshot
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"model {spec.name!r} variant {spec.variant!r} is scaled to zero and no "
                        f"copy became ready within the deadline ({time.monotonic() - started:.1f}"
                        " s); the copy keeps loading: retry"
                    )
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(remaining, 0.5))
        finally:
            with contextlib.suppress(Exception):
                await self._wake(key, False)

    def _select(
        self,
        snapshot: Snapshot,
        spec: mesh_pb2.ModelSpec,
        zone: str,
        tried: set[str],
        route: trace.Span,
        reason: str,
        predicted_s: float = math.inf,
    ) -> NodeView | None:
        """Pick a copy of ``spec`` not in ``tried`` (and add it there); None when none is left.
        ``route``: the routing decision's span, told the candidates, the pick and the reason."""
        candidates = [n for n in self._candidates(snapshot, spec) if n.node_id not in tried]
        # Narrowed after the tried copies are removed: a retry may leave the zone.
        node = self._pick(prefer_local(candidates, zone), spec) if candidates else None
        if node is not None:
            tried.add(node.node_id)
        if route.is_recording():
            route.set_attributes(
                {
                    "meshserve.candidates": len(candidates),
                    "meshserve.node": node.node_id if node is not None else "",
                    "meshserve.variant": spec.variant,
                    "meshserve.route_reason": reason,
                }
            )
            if math.isfinite(predicted_s):
                route.set_attribute("meshserve.predicted_ms", round(predicted_s * 1000, 3))
        return node

    def _switch(
        self,
        request: inference_pb2.ModelInferRequest,
        snapshot: Snapshot,
        model: str,
        slo_s: float | None,
        min_accuracy: float | None,
        span: trace.Span,
    ) -> Choice:
        """The variant for a query with an SLO and/or a minimum accuracy (see switching.py)."""
        variants = snapshot.variants(model)
        if not variants:
            raise NotFound(f"unknown model {model!r}" if model else "model name is empty")
        self._switched.add(model)
        options = [VariantOption(spec, self._loads(snapshot, spec)) for spec in variants]
        choice = self._switcher.choose(model, options, slo_s, min_accuracy)
        floor = min_accuracy or 0.0
        better = sorted(
            (
                o.spec
                for o in options
                if o.copies
                and o.spec.serving.cache
                and o.spec.accuracy > choice.spec.accuracy
                and o.spec.accuracy >= floor
            ),
            key=lambda s: -s.accuracy,
        )
        if better:  # a node holding one of them may have this exact answer cached: free
            request.parameters[PREFER].string_param = ",".join(s.variant for s in better)
        span.set_attribute("meshserve.switch_reason", choice.reason)
        if choice.predicted_s != float("inf"):
            span.set_attribute("meshserve.predicted_ms", round(choice.predicted_s * 1000, 3))
        if slo_s is not None:
            span.set_attribute("meshserve.slo_ms", slo_s * 1000)
        return choice

    def explain_switching(
        self, model: str, slo_ms: float, min_accuracy: float
    ) -> mesh_pb2.ExplainSwitchingResponse:
        """What :meth:`_switch` would choose for a query to ``model`` now, and why."""
        snapshot = self._snapshot()
        variants = snapshot.variants(model)
        if not variants:
            raise NotFound(f"unknown model {model!r}")
        slo_s = slo_ms / 1000.0 if slo_ms > 0 else _default_slo(variants)
        options = [VariantOption(spec, self._loads(snapshot, spec)) for spec in variants]
        choice = self._switcher.choose(model, options, slo_s, min_accuracy or None, commit=False)
        out = mesh_pb2.ExplainSwitchingResponse(
            chosen=choice.spec.variant, reason=choice.reason, slo_ms=(slo_s or 0.0) * 1000
        )
        for option in sorted(options, key=lambda o: -o.spec.accuracy):
            best = min(option.copies, key=predict_seconds, default=None)
            predicted = predict_seconds(best) if best is not None else math.inf
            out.variants.add(
                variant=option.spec.variant,
                accuracy=option.spec.accuracy,
                predicted_ms=predicted * 1000 if math.isfinite(predicted) else -1.0,
                ready_copies=len(option.copies),
                queued=best.queued if best is not None else 0,
                slowdown=best.slowdown if best is not None else 1.0,
            )
        return out

    def _loads(self, snapshot: Snapshot, spec: mesh_pb2.ModelSpec) -> list[CopyLoad]:
        return [self._copy_load(node, spec) for node in self._candidates(snapshot, spec)]

    def _copy_load(self, node: NodeView, spec: mesh_pb2.ModelSpec) -> CopyLoad:
        """What the switcher knows of one ready copy right now."""
        status = node.copies.get((spec.name, spec.variant))
        profile = {p.batch_size: p.seconds for p in status.latency_profile} if status else {}
        reported, max_batch = 0, spec.serving.batching.max_batch_size or 32
        session = self._hub.sessions.get(node.node_id)
        m = session.copy_telemetry((spec.name, spec.variant)) if session is not None else None
        if m is not None:
            reported = int(m.in_flight)
            max_batch = int(m.max_batch_size) or max_batch
        copy_key = (node.node_id, spec.name, spec.variant)
        inline = bool(profile) and profile.get(1, 1.0) <= 100e-6
        return CopyLoad(
            node_id=node.node_id,
            profile=profile,
            queued=max(self.balancer.in_flight(copy_key), reported),
            batched=bool(status and status.batched),
            max_batch=max_batch,
            parallel=1 if inline else max(1, int(node.hardware.cpu_cores)),
            observed_s=0.0 if profile else self.balancer.observed(copy_key, decay_s=1.0),
            slowdown=self.calibration.factor(copy_key),
        )

    def _variant(self, snapshot: Snapshot, model: str, version: str) -> mesh_pb2.ModelSpec:
        """The variant a query naming ``version`` (a variant, an alias or "") gets; an alias's
        canary is never drawn here (metadata and readiness describe the serving version)."""
        return self._resolve(snapshot, model, version, 100.0)[0]

    def _resolve(
        self, snapshot: Snapshot, model: str, version: str, draw: float
    ) -> tuple[mesh_pb2.ModelSpec, Route | None]:
        """The variant for a query naming ``version``, and the alias route it followed (None:
        none). ``draw`` in [0, 100): below the alias's canary percent selects the canary."""
        if not model:
            raise NotFound("model name is empty")
        variants = snapshot.variants(model)
        if not variants:
            raise NotFound(f"unknown model {model!r}")
        by_name = {s.variant: s for s in variants}
        alias = alias_for(snapshot.aliases, by_name, model, version)
        if alias is not None:
            route = resolve(alias, self._version_states(snapshot, model, alias), draw)
            spec = by_name.get(route.version)
            if spec is None:
                raise FailedPrecondition(
                    f"alias {alias.alias!r} of model {model!r} points at version "
                    f"{route.version!r}, which is not registered; roll the alias out to a "
                    f"registered version (meshctl model rollout {model} VERSION)"
                )
            return spec, route
        if version:
            spec = by_name.get(version)
            if spec is not None:
                return spec, None
            names = ", ".join(sorted(by_name))
            raise NotFound(f"model {model!r} has no variant or alias {version!r} (has: {names})")
        return self._best(snapshot, variants), None

    def _version_states(
        self, snapshot: Snapshot, model: str, alias: mesh_pb2.Alias
    ) -> dict[str, VersionState]:
        """Ready and wanted copies of each registered version ``alias`` may route to. Wanted:
        the nodes its placement names (copies that cannot be placed are not waited for), else
        the registered copies."""
        out = {}
        for name in versions_of(alias):
            spec = snapshot.models.get((model, name))
            if spec is None:
                continue
            placement = snapshot.placements.get((model, name))
            wanted = len(placement.nodes) if placement is not None else 0
            ready = len(self._candidates(snapshot, spec))
            out[name] = VersionState(ready, wanted or max(1, spec.copies))
        return out

    def alias_status(self, model: str, alias: mesh_pb2.Alias) -> mesh_pb2.AliasStatus:
        """What ``alias`` serves now on this replica's view (for the Admin API)."""
        snapshot = self._snapshot()
        return alias_status(alias, self._version_states(snapshot, model, alias))

    def serving_version(self, model: str, version: str = "") -> str:
        """The variant a query to ``model`` naming ``version`` (an alias, or none) gets now,
        its canary aside; "" when it would get none."""
        try:
            return self._variant(self._snapshot(), model, version).variant
        except StatusError:
            return ""

    def _best(self, snapshot: Snapshot, variants: list[mesh_pb2.ModelSpec]) -> mesh_pb2.ModelSpec:
        """The most accurate variant with a ready copy (any variant when none has one)."""
        ready = [s for s in variants if self._candidates(snapshot, s)]
        pool = ready or variants
        return max(pool, key=lambda s: (s.accuracy, s.variant == "default", s.variant))

    def _candidates(self, snapshot: Snapshot, spec: mesh_pb2.ModelSpec) -> list[NodeView]:
        key = (spec.name, spec.variant)
        reachable = [
            n
            for n in snapshot.ready_nodes(key)
            if n.direct_address or n.node_id in self._hub.sessions
        ]
        # New queries go to copies the placement still wants on nodes not draining (an evicted
        # or drained copy finishes what it has in flight, then unloads), while any can answer.
        placement = snapshot.placements.get(key)
        wanted = set(placement.nodes) if placement is not None else set()
        serving = [n for n in reachable if n.node_id not in snapshot.draining]
        preferred = [n for n in serving if n.node_id in wanted]
        return preferred or serving or reachable

    def _pick(self, candidates: list[NodeView], spec: mesh_pb2.ModelSpec) -> NodeView:
        def key(node: NodeView) -> CopyKey:
            return (node.node_id, spec.name, spec.variant)

        variant = (spec.name, spec.variant)

        def queue_depth(node: NodeView) -> int:
            session = self._hub.sessions.get(node.node_id)
            m = session.copy_telemetry(variant) if session is not None else None
            return int(m.queue_depth) if m is not None else 0

        return self.balancer.pick(candidates, key, queue_depth)

    def _no_copy(self, snapshot: Snapshot, spec: mesh_pb2.ModelSpec) -> StatusError:
        placement = snapshot.placements.get((spec.name, spec.variant))
        detail = ""
        if placement is not None and placement.failed:
            reasons = "; ".join(f"{n}: {r}" for n, r in sorted(placement.failed.items()))
            detail = f"; failed copies: {reasons}"
        elif placement is not None and placement.nodes:
            detail = f"; placed on {', '.join(placement.nodes)}, not ready yet"
        return Unavailable(
            f"model {spec.name!r} variant {spec.variant!r} has no ready copy{detail}"
        )

    async def _forward(
        self,
        node: NodeView,
        spec: mesh_pb2.ModelSpec,
        request: inference_pb2.ModelInferRequest,
        timeout: float | None,
        span: trace.Span,
        attempt: int = 1,
    ) -> inference_pb2.ModelInferResponse:
        """Send ``request`` to ``node`` as a ``gateway forward`` span (the node's parent)."""
        path = "direct" if node.direct_address else "tunnel"
        span.set_attribute("meshserve.path", path)
        with _child(span, "gateway forward", trace.SpanKind.CLIENT) as fwd:
            if fwd.is_recording():
                fwd.set_attributes(
                    {
                        "meshserve.attempt": attempt,
                        "meshserve.node": node.node_id,
                        "meshserve.path": path,
                    }
                )
            return await self._send(node, spec, request, timeout)

    async def _send(
        self,
        node: NodeView,
        spec: mesh_pb2.ModelSpec,
        request: inference_pb2.ModelInferRequest,
        timeout: float | None,
    ) -> inference_pb2.ModelInferResponse:
        key = (node.node_id, spec.name, spec.variant)
        baseline = 0.0
        if spec.name in self._switched:  # calibrate predictions for models that switch
            load = self._copy_load(node, spec)
            if load.profile:
                baseline = predict_seconds(dataclasses.replace(load, slowdown=1.0))
        self.balancer.started(key)
        started, ok = time.monotonic(), True
        try:
            if node.direct_address:
                stub = self._stub(node.direct_address)
                try:
                    response: inference_pb2.ModelInferResponse = await stub.ModelInfer(
                        request, timeout=timeout, metadata=metadata_with_context()
                    )
                except aio.AioRpcError as exc:
                    raise from_code(exc.code().value[0], exc.details() or exc.code().name) from None
            else:
                session = self._hub.sessions.get(node.node_id)
                if session is None:
                    raise Unavailable(f"node {node.node_id} is not linked to this replica")
                response = await session.tunnel(request, timeout, inject_map())
            return response
        except StatusError as exc:
            ok = exc.code not in _COPY_FAULTS  # a caller's bad input says nothing of the copy
            raise
        finally:
            elapsed = time.monotonic() - started
            self.balancer.finished(key, elapsed, ok)
            if ok and baseline:
                self.calibration.observe(key, baseline, elapsed)

    def _stub(self, address: str) -> inference_pb2_grpc.GRPCInferenceServiceStub:
        """One channel and one stub per node address, reused by every query."""
        entry = self._channels.get(address)
        if entry is None:
            if self._node_credentials is None:
                channel = aio.insecure_channel(address, options=self._channel_options)
            else:  # mTLS: the replica's certificate as the client's
                channel = aio.secure_channel(
                    address, self._node_credentials, options=self._channel_options
                )
            entry = self._channels[address] = (
                channel,
                inference_pb2_grpc.GRPCInferenceServiceStub(channel),
            )
        return entry[1]

    async def close(self) -> None:
        channels, self._channels = [c for c, _ in self._channels.values()], {}
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)
