"""Forwarding: sending a query to the copies its router resolved, and what that measures.

One :class:`Forwarder` per gateway holds the I/O side of routing: one channel per node address
and the hub's streams. Its decisions (which copy; what each attempt measures) are the gateway's
:class:`~meshserve.common.routing.router.Router`, the same core the SDK routes with.

Contract:

- :meth:`Forwarder.select` picks a copy among the candidates not tried yet (preferring the
  query's zone, :func:`~meshserve.common.routing.locality.prefer_local`; then power of two
  choices on live load), adds it to ``tried`` and returns it; None when none is left. A retry
  narrows after removing the tried copies, so it may leave the zone.
- :meth:`Forwarder.attempts` sends the query to the chosen copy: directly to the node's own port
  when it has one, else through the ``tunnel`` seam (down the node's stream held by this
  replica; a router without node streams has none). Direct queries go over one multiplexed
  ``NodeInference.Infer`` stream per node address (:class:`~meshserve.common.mux.MuxChannel`,
  opened on first use): the request's bytes pass through unchanged, the chosen variant, the
  ``prefer`` list, the trace context and the remaining budget ride in the frame, and the node's
  answer comes back as bytes, unparsed. ``mux=False`` sends unary ``ModelInfer`` calls instead
  (the request rewritten with the variant; kept for comparison). Every call to a node carries
  :meth:`Forwarder.node_metadata` (one place). An UNAVAILABLE or RESOURCE_EXHAUSTED answer,
  or a first attempt that stalled (a grey failure: no answer within 20 x the copy's observed
  latency, at least 0.5 s, when another copy exists and the deadline leaves room for two), is
  retried once on another copy (inference is idempotent), never past the caller's deadline.
  With no other copy the first error stands (a full copy's RESOURCE_EXHAUSTED keeps its
  retry-after hint). Every attempt is bracketed by :meth:`Router.begin`/:meth:`Router.end`
  (failed on a copy fault, not on the caller's bad input) and is one ``gateway forward`` span
  (CLIENT) whose context is the one the node receives (stream frame, call metadata or tunnel
  frame); a retry decides again under its own ``gateway route`` span and records a ``reroute``
  event (not for a full copy).
- :meth:`Forwarder.relay` hands a whole query to a gateway that can reach the variant (the
  ``fallback`` seam: a standalone gateway's replica, which holds the nodes' streams) as one
  ``gateway forward`` span (path ``replica``), for a variant with no candidate copy here
  (tunnel-only, or scaled to zero).
- :meth:`Forwarder.cold_start` wakes a variant scaled to zero (the replica's ``wake`` seam: an
  etcd key the leader acts on) and waits for a ready copy up to the deadline (or
  ``cold_start_max_s``), re-checking on every view change (:meth:`notify`); the wait is the
  ``meshserve.cold_start_ms`` span attribute and a ``scale`` event. The wake is always withdrawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Any, TypeAlias

import grpc
from grpc import aio
from opentelemetry import trace

from meshserve.common.errors import DeadlineExceeded, StatusError, Unavailable, from_code
from meshserve.common.mux import MuxChannel
from meshserve.common.params import PREFER
from meshserve.common.routing.resolve import candidates
from meshserve.common.routing.router import Router
from meshserve.common.tenancy import caller_pairs
from meshserve.common.tracing import inject_map, metadata_with_context
from meshserve.controlplane.observe.events import EventSink
from meshserve.controlplane.snapshot import NodeView, Snapshot, VariantKey
from meshserve.protos import inference_pb2, mesh_pb2

__all__ = ["Answer", "Fallback", "Forwarder", "Query", "Tunnel", "child_span"]

#: A query's answer: the node's serialized ``ModelInferResponse`` (passed through), or a message.
Answer: TypeAlias = "bytes | inference_pb2.ModelInferResponse"

#: Sends a query down the stream of node ``node_id`` (a replica's hub session):
#: ``tunnel(node_id, request, timeout, trace_context)``.
Tunnel: TypeAlias = Callable[
    [str, inference_pb2.ModelInferRequest, "float | None", dict[str, str]],
    Awaitable[inference_pb2.ModelInferResponse],
]

#: Hands a whole query (its serialized request, as the caller sent it) to a gateway that can
#: reach ``spec``: ``fallback(request, spec, timeout, metadata)`` -> the serialized answer.
Fallback: TypeAlias = Callable[
    [bytes, mesh_pb2.ModelSpec, "float | None", Sequence[tuple[str, str]]], Awaitable[bytes]
]

#: The OIP unary method, called with raw bytes (``mux=False``).
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

_tracer = trace.get_tracer("meshserve.gateway")

#: A first attempt with another copy to fall back on gets at most this factor of the copy's
#: observed latency (and at least _STUCK_MIN_S), when the caller's deadline leaves room for two.
_STUCK_FACTOR = 20.0
_STUCK_MIN_S = 0.5

#: Answers retried once on another copy (inference is idempotent): the copy is gone, or full.
_RETRIABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

#: Call metadata naming who a query counts against (the gateway's admission, per client).
CLIENT_ID_KEY = "x-client-id"

_COPY_FAULTS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)


def child_span(
    span: trace.Span, name: str, kind: trace.SpanKind = trace.SpanKind.INTERNAL
) -> contextlib.AbstractContextManager[trace.Span]:
    """A current child span of ``span`` (the query's); ``span`` itself when it does not record
    (not sampled, or no tracing configured): a no-op span still costs microseconds per query,
    and the context sent on is the same either way."""
    if span.is_recording():
        return _tracer.start_as_current_span(name, kind=kind)
    return contextlib.nullcontext(span)


async def _close(mux: MuxChannel | None, channel: aio.Channel) -> None:
    if mux is not None:
        await mux.close()
    await channel.close(None)


class Query:
    """One ModelInfer query: the parsed request and, when the server handed them over, its
    bytes as received (passed on unchanged; see
    :func:`meshserve.controlplane.dataplane.gateway.add_gateway_to_server`). ``model_name``
    is the request's (what the auth checks read)."""

    __slots__ = ("_data", "message")

    def __init__(self, message: inference_pb2.ModelInferRequest, data: bytes | None = None) -> None:
        self.message = message
        self._data = data

    @classmethod
    def parse(cls, data: bytes) -> Query:
        """A request deserializer: the bytes and their message (DecodeError when malformed)."""
        return cls(inference_pb2.ModelInferRequest.FromString(data), data)

    @property
    def model_name(self) -> str:
        return self.message.model_name

    def data(self) -> bytes:
        """The request's bytes as received (serialized once when none were)."""
        if self._data is None:
            self._data = self.message.SerializeToString()
        return self._data

    def rewritten(self, variant: str, prefer: str) -> inference_pb2.ModelInferRequest:
        """The message naming ``variant`` (and the ``prefer`` list), for a hop that takes no
        frame (the tunnel, unary calls). Bytes taken later carry the same variant and prefer
        list a frame would."""
        message = self.message
        message.model_version = variant
        if prefer:
            message.parameters[PREFER].string_param = prefer
        return message


class Forwarder:
    def __init__(
        self,
        *,
        router: Router,
        snapshot: Callable[[], Snapshot],
        channel_options: list[tuple[str, Any]],
        node_credentials: grpc.ChannelCredentials | None = None,
        events: EventSink | None = None,
        wake: Callable[[VariantKey, bool], Awaitable[None]] | None = None,
        cold_start_max_s: float = 60.0,
        tunnel: Tunnel | None = None,
        fallback: Fallback | None = None,
        mux: bool = True,
        max_message_bytes: int = 64 << 20,
        node_metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        """``router``: the gateway's decisions (its ``linked``: the nodes ``tunnel`` reaches).
        ``snapshot``: the current view (re-read after a failed attempt and while waiting for a
        cold start). ``node_credentials``: to nodes' direct ports (None: insecure). ``wake``:
        asks the leader for a copy of a scaled-to-zero variant (True) or withdraws the ask
        (False); None: such a query fails at once (or goes to ``fallback``). ``tunnel``: sends
        a query down a node's stream (None: no node streams). ``fallback``: where a query goes
        whose variant has no candidate here (:meth:`relay`; None: nowhere). ``mux``: direct
        queries over multiplexed streams (False: unary calls). ``node_metadata``: the
        credential every call to a node carries (a replica's router key, see
        :meth:`node_metadata`)."""
        self.router = router
        self._node_metadata = tuple(node_metadata)
        self._snapshot = snapshot
        self._channel_options = channel_options
        self._node_credentials = node_credentials
        self._events = events
        self._wake = wake
        self._cold_start_max_s = cold_start_max_s
        self._tunnel = tunnel
        self.fallback = fallback
        self.mux = mux
        self._max_message_bytes = max_message_bytes
        self._channels: dict[str, aio.Channel] = {}
        self._muxes: dict[str, MuxChannel] = {}
        self._unary: dict[str, Any] = {}  # address -> raw-bytes ModelInfer callable
        self._closing: set[asyncio.Future[None]] = set()
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """The view changed: a cold start waiting for a copy looks again."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- choosing a copy ---------------------------------------------------------------------

    def select(
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
        node, left = self.router.select(snapshot, spec, zone, tried)
        if route.is_recording():
            route.set_attributes(
                {
                    "meshserve.candidates": left,
                    "meshserve.node": node.node_id if node is not None else "",
                    "meshserve.variant": spec.variant,
                    "meshserve.route_reason": reason,
                }
            )
            if math.isfinite(predicted_s):
                route.set_attribute("meshserve.predicted_ms", round(predicted_s * 1000, 3))
        return node

    # -- attempts ----------------------------------------------------------------------------

    async def attempts(
        self,
        query: Query,
        spec: mesh_pb2.ModelSpec,
        snapshot: Snapshot,
        node: NodeView,
        zone: str,
        tried: set[str],
        deadline: float | None,
        span: trace.Span,
        fallback: bool,
        prefer: str = "",
    ) -> tuple[Answer, str]:
        """Forward to ``node``, retrying once on another copy (the module's contract); the
        answer and the id of the node that gave it. ``fallback``: another READY copy exists,
        so a stalled first attempt is cut short. ``prefer``: the more accurate variants whose
        cached answer the node may return."""
        failure: StatusError | None = None
        for attempt in (1, 2):
            if attempt == 2:
                with child_span(span, "gateway route") as route:
                    other = self.select(snapshot, spec, zone, tried, route, "retry")
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
                    _STUCK_FACTOR
                    * self.router.balancer.observed((node.node_id, spec.name, spec.variant)),
                )
                if timeout is None or timeout > 2 * stuck:
                    limit = stuck
            try:
                answer = await self._forward(node, spec, query, prefer, limit, span, attempt)
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
            return answer, node.node_id
        raise Unavailable(
            f"model {spec.name!r}: no copy answered (tried {', '.join(sorted(tried))})"
        )

    async def _forward(
        self,
        node: NodeView,
        spec: mesh_pb2.ModelSpec,
        query: Query,
        prefer: str,
        timeout: float | None,
        span: trace.Span,
        attempt: int = 1,
    ) -> Answer:
        """Send ``query`` to ``node`` as a ``gateway forward`` span (the node's parent)."""
        path = "direct" if node.direct_address else "tunnel"
        span.set_attribute("meshserve.path", path)
        with child_span(span, "gateway forward", trace.SpanKind.CLIENT) as fwd:
            if fwd.is_recording():
                fwd.set_attributes(
                    {
                        "meshserve.attempt": attempt,
                        "meshserve.node": node.node_id,
                        "meshserve.path": path,
                    }
                )
            return await self._send(node, spec, query, prefer, timeout)

    async def _send(
        self,
        node: NodeView,
        spec: mesh_pb2.ModelSpec,
        query: Query,
        prefer: str,
        timeout: float | None,
    ) -> Answer:
        attempt = self.router.begin(node, spec)
        ok = answered = True
        try:
            address = node.direct_address
            if address and self.mux:
                return await self._mux(address).call(
                    query.data(),
                    variant=spec.variant,
                    prefer=prefer,
                    trace_context=inject_map(dict(caller_pairs())),
                    timeout=timeout,
                )
            request = query.rewritten(spec.variant, prefer)
            if address:
                call = self._unary_call(address)
                try:
                    data: bytes = await call(
                        request,
                        timeout=timeout,
                        metadata=metadata_with_context(
                            (*self.node_metadata(address), *caller_pairs())
                        ),
                    )
                except aio.AioRpcError as exc:
                    raise from_code(exc.code().value[0], exc.details() or exc.code().name) from None
                return data
            if self._tunnel is None:
                raise Unavailable(f"node {node.node_id} has no direct address to reach it by")
            context = inject_map(dict(caller_pairs()))  # whose query: the node logs it so
            return await self._tunnel(node.node_id, request, timeout, context)
        except StatusError as exc:
            ok = exc.code not in _COPY_FAULTS  # a caller's bad input says nothing of the copy
            answered = False
            raise
        finally:
            self.router.end(attempt, ok, answered)

    # -- the whole query elsewhere -----------------------------------------------------------

    async def relay(
        self,
        query: Query,
        spec: mesh_pb2.ModelSpec,
        deadline: float | None,
        span: trace.Span,
        client: str = "",
    ) -> bytes:
        """Hand ``query`` as the caller sent it to the ``fallback`` gateway (see the module
        contract); Unavailable when there is none."""
        if self.fallback is None:
            raise Unavailable(f"model {spec.name!r} variant {spec.variant!r}: no copy reachable")
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded(f"model {spec.name!r}: the deadline passed before forwarding")
        span.set_attribute("meshserve.path", "replica")
        with child_span(span, "gateway forward", trace.SpanKind.CLIENT) as fwd:
            if fwd.is_recording():
                fwd.set_attributes({"meshserve.attempt": 1, "meshserve.path": "replica"})
            extra = ((CLIENT_ID_KEY, client),) if client else ()
            return await self.fallback(query.data(), spec, timeout, metadata_with_context(extra))

    # -- channels to nodes -------------------------------------------------------------------

    def node_metadata(self, address: str) -> tuple[tuple[str, str], ...]:
        """The call metadata every query to the node at ``address`` carries (unary calls; the
        multiplexed stream sends it when it opens). The one place a per-node credential goes:
        a replica's router key (``x-meshserve-router``), which nodes enforcing tenant rights
        let through as they do a router's certificate (see meshserve.node.rights)."""
        return self._node_metadata

    def _channel(self, address: str) -> aio.Channel:
        """One channel per node address, shared by its stream and its unary calls."""
        channel = self._channels.get(address)
        if channel is None:
            if self._node_credentials is None:
                channel = aio.insecure_channel(address, options=self._channel_options)
            else:  # mTLS: the replica's certificate as the client's
                channel = aio.secure_channel(
                    address, self._node_credentials, options=self._channel_options
                )
            self._channels[address] = channel
        return channel

    def _mux(self, address: str) -> MuxChannel:
        """The multiplexed stream to the node at ``address`` (one per address, reused)."""
        mux = self._muxes.get(address)
        if mux is None:
            mux = self._muxes[address] = MuxChannel(
                self._channel(address),
                metadata=self.node_metadata(address),
                max_message_bytes=self._max_message_bytes,
                address=address,
            )
        return mux

    def _unary_call(self, address: str) -> Any:
        """ModelInfer on the node at ``address``: a request message in, the answer's bytes out."""
        call = self._unary.get(address)
        if call is None:
            call = self._unary[address] = self._channel(address).unary_unary(
                _MODEL_INFER,
                request_serializer=inference_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=None,
            )
        return call

    # -- scale from zero ---------------------------------------------------------------------

    async def cold_start(
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
                if candidates(snapshot, spec, self.router.linked):
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

    def prune(self, addresses: Container[str]) -> None:
        """Close the streams and channels to node addresses not in ``addresses`` (nodes gone
        from the view), in the background; a query still on one fails UNAVAILABLE (retried)."""
        for address in [a for a in self._channels if a not in addresses]:
            mux = self._muxes.pop(address, None)
            channel = self._channels.pop(address)
            self._unary.pop(address, None)
            task = asyncio.ensure_future(_close(mux, channel))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """End every stream to a node (awaited), then close every channel."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        muxes, self._muxes = list(self._muxes.values()), {}
        await asyncio.gather(*(m.close() for m in muxes), return_exceptions=True)
        channels, self._channels = list(self._channels.values()), {}
        self._unary.clear()
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)
