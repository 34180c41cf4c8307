"""Forwarding: sending a query to the copies its router resolved, and what that measures.

One :class:`Forwarder` per gateway holds the I/O side of routing: one channel per node address
and the hub's streams. Its decisions (which copy; what each attempt measures) are the gateway's
:class:`~meshserve.common.routing.router.Router`, the same core the SDK routes with.

Contract:

- :meth:`Forwarder.select` picks a copy among the candidates not tried yet (preferring the
  query's zone, :func:`~meshserve.common.routing.locality.prefer_local`; then power of two
  choices on live load), adds it to ``tried`` and returns it; None when none is left. A retry
  narrows after removing the tried copies, so it may leave the zone.
- :meth:`Forwarder.attempts` sends the query to the chosen copy: directly to the node's own OIP
  port when it has one (one channel and stub per address, reused), else down the node's stream
  held by this replica (the tunnel). An UNAVAILABLE or RESOURCE_EXHAUSTED answer, or a first
  attempt that stalled (a grey failure: no answer within 20 x the copy's observed latency, at
  least 0.5 s, when another copy exists and the deadline leaves room for two), is retried once
  on another copy (inference is idempotent), never past the caller's deadline. With no other
  copy the first error stands (a full copy's RESOURCE_EXHAUSTED keeps its retry-after hint).
  Every attempt is bracketed by ``Balancer.started``/``finished`` (failed on a copy fault, not
  on the caller's bad input) and is one ``gateway forward`` span (CLIENT) whose context is the
  one the node receives (call metadata or tunnel frame); a retry decides again under its own
  ``gateway route`` span and records a ``reroute`` event (not for a full copy).
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
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from opentelemetry import trace

from meshserve.common.errors import DeadlineExceeded, StatusError, Unavailable, from_code
from meshserve.common.routing.resolve import candidates
from meshserve.common.routing.router import Router
from meshserve.common.tracing import inject_map, metadata_with_context
from meshserve.controlplane.link.hub import Hub
from meshserve.controlplane.observe.events import EventSink
from meshserve.controlplane.snapshot import NodeView, Snapshot, VariantKey
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2

__all__ = ["Forwarder", "child_span"]

_tracer = trace.get_tracer("meshserve.gateway")

#: A first attempt with another copy to fall back on gets at most this factor of the copy's
#: observed latency (and at least _STUCK_MIN_S), when the caller's deadline leaves room for two.
_STUCK_FACTOR = 20.0
_STUCK_MIN_S = 0.5

#: Answers retried once on another copy (inference is idempotent): the copy is gone, or full.
_RETRIABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

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


class Forwarder:
    def __init__(
        self,
        *,
        hub: Hub,
        router: Router,
        snapshot: Callable[[], Snapshot],
        channel_options: list[tuple[str, Any]],
        node_credentials: grpc.ChannelCredentials | None = None,
        events: EventSink | None = None,
        wake: Callable[[VariantKey, bool], Awaitable[None]] | None = None,
        cold_start_max_s: float = 60.0,
    ) -> None:
        """``router``: the gateway's decisions (its ``linked`` is the hub's sessions).
        ``snapshot``: the replica's current view (re-read after a failed attempt and while
        waiting for a cold start). ``node_credentials``: TLS to nodes' direct ports (None:
        insecure). ``wake``: asks the leader for a copy of a scaled-to-zero variant (True) or
        withdraws the ask (False); None: such a query fails at once."""
        self._hub = hub
        self.router = router
        self._snapshot = snapshot
        self._channel_options = channel_options
        self._node_credentials = node_credentials
        self._events = events
        self._wake = wake
        self._cold_start_max_s = cold_start_max_s
        self._channels: dict[
            str, tuple[aio.Channel, inference_pb2_grpc.GRPCInferenceServiceStub]
        ] = {}
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
        """Forward to ``node``, retrying once on another copy (the module's contract).
        ``fallback``: another READY copy exists, so a stalled first attempt is cut short."""
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
        with child_span(span, "gateway forward", trace.SpanKind.CLIENT) as fwd:
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
        attempt = self.router.begin(node, spec)
        ok = True
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
            self.router.end(attempt, ok)

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

    async def close(self) -> None:
        """Close every channel to a node's direct port."""
        channels, self._channels = [c for c, _ in self._channels.values()], {}
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)
