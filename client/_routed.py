"""The SDK routes itself: the logic :class:`MeshClient` and :class:`AsyncMeshClient` share.

With ``routing="direct"`` (the default) the SDK subscribes to a replica's routing feed
(:class:`~meshserve.common.routing.feed.FeedClient`) and routes each query with the same
:class:`~meshserve.common.routing.router.Router` as the gateway: the variant
(:meth:`Router.decide`: version, alias and canary, SLO switching), then a copy on a node with a
direct address (:meth:`Router.select`: the query's zone first, else the client's; power of two
choices on this client's in-flight counts and the load the feed reports). The query goes straight
to that node: the ``NodeInference.Infer`` stream (:class:`~meshserve.common.mux.MuxChannel`,
asyncio client) or a unary ``ModelInfer`` (the blocking client, or ``transport="unary"``), with
the chosen variant and the PREFER list (:data:`meshserve.common.params.PREFER`) when switching
named one. Everything here but the sending is shared: :class:`RoutedCore` (the feed's view and
the router) and :class:`Query` (one attempt's steps, a small state machine); the twins only send.

Contract of one attempt (:class:`Query`), inside the attempt's deadline:

- The gateway answers instead (one step to the client's gateway channel, exactly the request
  the caller built) when: the feed has no full view yet (the first query waits for one at most
  :data:`FIRST_WAIT_S`; the feed keeps connecting in the background), the feed is silent (no
  message, heartbeats included, for :data:`SILENT_HEARTBEATS` x its heartbeat), the request's
  routing parameters do not parse, the router raises a domain error (NotFound,
  FailedPrecondition: the feed may lag a registration; the gateway has the authoritative
  answer), the variant has no candidate with a direct address (tunnel-only copies, scaled to
  zero: the gateway wakes it), or every direct copy tried failed.
- A direct attempt that fails with UNAVAILABLE, RESOURCE_EXHAUSTED or NOT_FOUND (the copy went
  while the feed lagged), or a first attempt that stalled (no answer within 20 x the copy's
  observed latency, at least 0.5 s and at most half the time left, when another copy exists
  and the deadline leaves at least 1 s), is retried on another copy (:data:`MAX_DIRECT` copies
  at most), then on the gateway.
  Any other error is the answer (a caller's bad input, PERMISSION_DENIED, ...).
- Every direct attempt is bracketed by :meth:`Router.begin` / :meth:`Router.end` (failed on a
  copy fault only; answered only when it brought an answer). A direct answer to a query with
  an SLO (its ``slo_ms``, else its version's default) gets ``meshserve_slo_met`` from the time
  measured since the call began.
- Tracing: each step is one ``client route`` span, child of the ``client ModelInfer`` span
  (attributes as the gateway's route span: ``meshserve.node``, ``meshserve.variant``,
  ``meshserve.candidates``, ``meshserve.route_reason``, plus ``meshserve.path`` =
  ``direct`` | ``gateway`` and ``meshserve.attempt``); its context is the one the node (or the
  gateway) receives, in the call metadata or the stream frame's ``trace_context``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from meshserve.common.errors import InvalidArgument, StatusError
from meshserve.common.params import CLIENT_ZONE, PREFER
from meshserve.common.routing.feed import FeedClient
from meshserve.common.routing.router import Attempt, Decision, Router
from meshserve.common.routing.view import NodeView, Snapshot, VariantKey
from meshserve.common.tracing import inject_map
from meshserve.protos import inference_pb2, mesh_pb2

__all__ = [
    "FIRST_WAIT_S",
    "MAX_DIRECT",
    "MODEL_INFER",
    "SILENT_HEARTBEATS",
    "FeedThread",
    "Query",
    "RoutedCore",
    "Routing",
    "Step",
    "Transport",
    "feed_targets",
    "query_facts",
]

_log = logging.getLogger("meshserve.client")
_tracer = trace.get_tracer("meshserve.client")

Routing = Literal["direct", "gateway"]
Transport = Literal["stream", "unary"]

#: The OIP unary method a direct query calls on a node (request passed as bytes).
MODEL_INFER: Final = "/inference.GRPCInferenceService/ModelInfer"
#: The first query waits at most this long for the feed's first full view (then: the gateway).
FIRST_WAIT_S: Final = 1.0
#: The feed counts as silent (the gateway answers) after this many heartbeats without a message.
SILENT_HEARTBEATS: Final = 3.0
#: Direct copies one attempt tries before the gateway.
MAX_DIRECT: Final = 2
#: A stalled first attempt (see the module contract).
_STUCK_FACTOR: Final = 20.0
_STUCK_MIN_S: Final = 0.5
#: Direct answers that send the query to another copy (then the gateway).
_ELSEWHERE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,  # a node without the stream service
    }
)
#: Answers that say something of the copy (not of the caller's input).
_COPY_FAULTS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
#: A node address absent from the feed this long loses its channels.
_FORGET_AFTER_S: Final = 30.0
#: Decisions held per view (model, name pairs), at most.
_DECISIONS_HELD: Final = 1024
_PRUNE_EVERY_S: Final = 5.0


class _Everyone:
    """Every node counts as reachable when deciding the variant: a copy the SDK cannot reach
    directly is reached through the gateway, so it must not change which variant answers."""

    def __contains__(self, node_id: object) -> bool:
        return True


def feed_targets(feed: str | Sequence[str] | None, target: str) -> list[str]:
    """The replica addresses to subscribe to: ``feed`` (comma-separated or a list), else the
    client's ``target`` list."""
    given = [feed] if isinstance(feed, str) else list(feed or [target])
    out = [t.strip() for item in given for t in item.split(",") if t.strip()]
    if not out:
        raise ValueError("routing='direct' needs at least one replica address for the feed")
    return out


def _number(param: inference_pb2.InferParameter) -> float:
    choice = param.WhichOneof("parameter_choice")
    value = getattr(param, choice) if choice else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"not a number: {value!r}")
    return float(value)


def query_facts(request: inference_pb2.ModelInferRequest) -> tuple[float | None, float | None]:
    """(latency budget in seconds, minimum accuracy) from the request's parameters, as the
    gateway reads them; InvalidArgument when one does not parse (the gateway then says why)."""
    slo_s = min_accuracy = None
    params = request.parameters
    if "slo_ms" in params:
        slo_ms = _number(params["slo_ms"])
        if not math.isfinite(slo_ms) or slo_ms <= 0:
            raise InvalidArgument("slo_ms must be positive")
        slo_s = slo_ms / 1000.0
    if "min_accuracy" in params:
        min_accuracy = _number(params["min_accuracy"])
        if not math.isfinite(min_accuracy) or min_accuracy < 0:
            raise InvalidArgument("min_accuracy must be a positive number")
    return slo_s, min_accuracy


def _zone_of(request: inference_pb2.ModelInferRequest) -> str:
    param = request.parameters.get(CLIENT_ZONE)
    if param is None or param.WhichOneof("parameter_choice") != "string_param":
        return ""
    return param.string_param.strip()


class RoutedCore:
    """What one client routes from: the feed's latest view (published by the feed's own loop,
    so the blocking client reads it from any thread), the router, and the node addresses seen.

    ``lock``: held around the router's decisions and measures (a ``threading.Lock`` for the
    blocking client, whose queries run on many threads; a no-op for the asyncio client)."""

    def __init__(
        self,
        *,
        zone: str = "",
        lock: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        self.router = Router(linked=_Everyone(), telemetry=self._load, zone=zone)
        self.lock: contextlib.AbstractContextManager[Any] = lock or contextlib.nullcontext()
        self.feed: FeedClient | None = None
        self.view: Snapshot | None = None
        self.addresses: frozenset[str] = frozenset()  # direct addresses in the view
        self._missing: dict[str, float] = {}  # address -> when it left the view
        self._pruned = time.monotonic()
        # decisions that depend on the view only, for the view they were made in
        self._decisions: tuple[
            Snapshot | None, dict[tuple[str, str], tuple[Decision, frozenset[str]]]
        ] = (None, {})

    def _load(self, node_id: str, key: VariantKey) -> mesh_pb2.ModelTelemetry | None:
        feed = self.feed
        return None if feed is None else feed.state.load(node_id, key)

    def attach(self, feed: FeedClient) -> None:
        """Route from ``feed`` (its callbacks publish every new view here)."""
        self.feed = feed
        feed.subscribe(lambda _update: self.publish())

    def publish(self) -> None:
        """Take the feed's current view (runs on the feed's loop, after every update)."""
        feed = self.feed
        if feed is None or not feed.state.has_view:
            return
        view = feed.snapshot()
        if view is not self.view:
            self.addresses = frozenset(
                n.direct_address for n in view.nodes.values() if n.direct_address
            )
            self.view = view

    def decided(
        self, view: Snapshot, key: tuple[str, str]
    ) -> tuple[Decision, frozenset[str]] | None:
        """A decision :meth:`remember` holds for ``key`` (model, name) in ``view``."""
        held_view, table = self._decisions
        return table.get(key) if held_view is view else None

    def remember(
        self, view: Snapshot, key: tuple[str, str], decision: Decision, tunnel: frozenset[str]
    ) -> None:
        """Hold ``decision`` for the next queries naming ``key`` while ``view`` is current, when
        it depends on nothing else: no SLO switching, no canary drawn from the request id
        (the router measures nothing for such a decision, so skipping it changes nothing)."""
        if decision.slo_s is not None or decision.switch_reason:
            return
        if decision.alias:
            alias = view.aliases.get((key[0], decision.alias))
            if alias is None or alias.canary_version or alias.canary_percent:
                return
        held_view, table = self._decisions
        if held_view is not view or len(table) >= _DECISIONS_HELD:
            table = {}
            self._decisions = (view, table)
        table[key] = (decision, tunnel)

    def unusable(self) -> str:
        """Why the feed cannot route now ("" when it can)."""
        feed, view = self.feed, self.view
        if feed is None or view is None or not feed.ready:
            return "the routing feed is not ready"
        heartbeat = feed.state.heartbeat_s
        age = feed.age_s()
        if age > SILENT_HEARTBEATS * heartbeat:
            return f"the routing feed is silent ({age:.1f}s, heartbeat {heartbeat:g}s)"
        return ""

    def prune_due(self) -> bool:
        """Whether :meth:`stale_addresses` has work (at most every :data:`_PRUNE_EVERY_S`)."""
        return time.monotonic() - self._pruned >= _PRUNE_EVERY_S and self.view is not None

    def stale_addresses(self, held: Sequence[str]) -> list[str]:
        """The addresses of ``held`` (channels a twin keeps) to close now: absent from the view
        for :data:`_FORGET_AFTER_S`. Also drops the router's measures of copies no longer in
        view. Call it when :meth:`prune_due` (one caller at a time)."""
        now = time.monotonic()
        if self.view is None:
            return []
        self._pruned = now
        view, present = self.view, self.addresses
        with self.lock:
            self.router.forget(lambda key: key[0] in view.nodes)
        out = []
        for address in held:
            if address in present:
                self._missing.pop(address, None)
            elif now - self._missing.setdefault(address, now) >= _FORGET_AFTER_S:
                self._missing.pop(address, None)
                out.append(address)
        return out


@dataclass(slots=True)
class Step:
    """One send of a query: to a node (``node``) or to the gateway (``node`` None)."""

    node: NodeView | None
    timeout: float  # seconds this send may take
    limited: bool  # cut short of the deadline (a stalled first attempt is retried)
    metadata: list[tuple[str, str]]  # call metadata: the route span's trace context
    trace_context: dict[str, str]  # the same, for a stream frame
    number: int
    span: trace.Span | None = None
    attempt: Attempt | None = None
    variant: str = ""
    prefer: str = ""
    fallback: str = ""  # why the gateway answers ("": a direct step)


@dataclass(slots=True)
class Query:
    """One attempt of one query through the routed path (see the module contract). The twins
    send each :class:`Step` it gives and report back: :meth:`answered`, :meth:`failed` (which
    returns the next step or raises), :meth:`abandoned` (cancelled)."""

    core: RoutedCore
    request: inference_pb2.ModelInferRequest
    deadline: float  # time.monotonic()
    started: float  # when the caller's call began (for meshserve_slo_met)
    parent: Context  # the client ModelInfer span's context
    zone: str = ""
    decision: Decision | None = None
    snapshot: Snapshot | None = None
    tried: set[str] = field(default_factory=set)
    direct: int = 0  # direct sends so far
    number: int = 0  # sends so far
    _base: bytes = b""
    _unary: bytes = b""

    # -- the payloads ----------------------------------------------------------------------

    @property
    def base(self) -> bytes:
        """The caller's request, serialized once (a stream frame carries variant and prefer)."""
        if not self._base:
            self._base = self.request.SerializeToString()
        return self._base

    def unary_payload(self, step: Step) -> bytes:
        """The request for a node's unary ModelInfer: the caller's bytes with the chosen
        variant and prefer list appended (a later field wins when protobuf parses)."""
        if not self._unary:
            extra = inference_pb2.ModelInferRequest(model_version=step.variant)
            if step.prefer:
                extra.parameters[PREFER].string_param = step.prefer
            self._unary = self.base + extra.SerializeToString()
        return self._unary

    # -- the steps -------------------------------------------------------------------------

    def first(self) -> Step:
        core = self.core
        why = core.unusable()
        if why:
            return self._gateway(why)
        snapshot = core.view
        assert snapshot is not None
        request = self.request
        try:
            slo_s, min_accuracy = query_facts(request)
        except InvalidArgument as exc:
            return self._gateway(f"routing parameters: {exc.message}")
        self.zone = self.zone or _zone_of(request)
        key = (request.model_name, request.model_version)
        plain = slo_s is None and min_accuracy is None
        held = core.decided(snapshot, key) if plain else None
        if held is not None:
            decision, tunnel_only = held
        else:
            router = core.router
            with core.lock:
                try:
                    decision = router.decide(
                        snapshot,
                        request.model_name,
                        request.model_version,
                        request.id,
                        slo_s,
                        min_accuracy,
                    )
                except StatusError as exc:
                    return self._gateway(f"{exc.code.name.lower()}: {exc.message}")
                # copies without a direct address are the gateway's
                tunnel_only = frozenset(
                    n.node_id
                    for n in router.candidates(snapshot, decision.spec)
                    if not n.direct_address
                )
            if plain:
                core.remember(snapshot, key, decision, tunnel_only)
        self.tried.update(tunnel_only)
        self.decision, self.snapshot = decision, snapshot
        return self._direct(decision.reason) or self._gateway("no direct copy")

    def failed(self, step: Step, error: StatusError) -> Step:
        """The next step after ``step`` failed with ``error``; raises ``error`` when none."""
        self._finish(step, error)
        if step.node is None:  # the gateway's answer stands (the retry policy may retry)
            raise error
        code = error.code
        stalled = code == grpc.StatusCode.DEADLINE_EXCEEDED and step.limited
        if code not in _ELSEWHERE and not stalled:
            raise error
        if self.deadline - time.monotonic() <= 0:
            raise error
        reason = f"{step.node.node_id}: {code.name}"
        if self.direct < MAX_DIRECT and not self.core.unusable():
            self.snapshot = self.core.view or self.snapshot
            nxt = self._direct(f"retry ({reason})")
            if nxt is not None:
                return nxt
        return self._gateway(f"every direct copy failed (last: {reason})")

    def answered(
        self, step: Step, response: inference_pb2.ModelInferResponse
    ) -> inference_pb2.ModelInferResponse:
        self._finish(step, None)
        decision = self.decision
        if step.node is not None and decision is not None and decision.slo_s is not None:
            met = time.monotonic() - self.started <= decision.slo_s
            response.parameters["meshserve_slo_met"].bool_param = met
            span = trace.get_current_span(self.parent)
            if span.is_recording():
                span.set_attribute("meshserve.slo_met", met)
        return response

    def abandoned(self, step: Step) -> None:
        """``step`` was cancelled (a hedged attempt that lost, a caller gone)."""
        self._finish(step, None, cancelled=True)

    # -- internals -------------------------------------------------------------------------

    def _direct(self, reason: str) -> Step | None:
        decision, snapshot = self.decision, self.snapshot
        if decision is None or snapshot is None:
            return None
        spec = decision.spec
        core = self.core
        with core.lock:
            node, left = core.router.select(snapshot, spec, self.zone, self.tried)
            if node is None:
                return None
            remaining = self.deadline - time.monotonic()
            limit, limited = remaining, False
            if self.direct == 0 and left > 1:  # a grey failure must leave time for another
                observed = core.router.balancer.observed((node.node_id, spec.name, spec.variant))
                stuck = min(max(_STUCK_MIN_S, _STUCK_FACTOR * observed), remaining / 2)
                if stuck >= _STUCK_MIN_S:  # a copy once slow (high estimate) is still cut
                    limit, limited = stuck, True
            attempt = core.router.begin(node, spec)
        self.direct += 1
        step = self._step(
            node,
            max(0.001, limit),
            limited,
            {
                "meshserve.node": node.node_id,
                "meshserve.variant": spec.variant,
                "meshserve.candidates": left,
                "meshserve.route_reason": reason,
                "meshserve.path": "direct",
            },
        )
        step.attempt = attempt
        step.variant = spec.variant
        step.prefer = decision.prefer
        return step

    def _gateway(self, why: str) -> Step:
        attrs: dict[str, Any] = {"meshserve.path": "gateway", "meshserve.fallback": why}
        if self.decision is not None:
            attrs["meshserve.variant"] = self.decision.spec.variant
        remaining = self.deadline - time.monotonic()
        step = self._step(None, max(0.001, remaining), False, attrs)
        step.fallback = why
        return step

    def _step(
        self, node: NodeView | None, timeout: float, limited: bool, attrs: dict[str, Any]
    ) -> Step:
        self.number += 1
        parent = self.parent
        span: trace.Span | None = None
        ctx = parent
        current = trace.get_current_span(parent)
        if current.is_recording():
            attrs["meshserve.attempt"] = self.number
            span = _tracer.start_span("client route", context=parent, attributes=attrs)
            ctx = trace.set_span_in_context(span, parent)
        elif not current.get_span_context().is_valid:  # no trace at all: nothing to send on
            return Step(node, timeout, limited, [], {}, self.number, None)
        carrier = inject_map(ctx=ctx)
        return Step(node, timeout, limited, list(carrier.items()), carrier, self.number, span)

    def _finish(self, step: Step, error: StatusError | None, cancelled: bool = False) -> None:
        if step.attempt is not None:
            ok = error is None or error.code not in _COPY_FAULTS
            answered = error is None and not cancelled  # else its time teaches calibration nothing
            with self.core.lock:
                self.core.router.end(step.attempt, ok, answered)
            step.attempt = None
        span = step.span
        if span is not None:
            if error is not None:
                span.set_attribute("meshserve.error", f"{error.code.name}: {error.message}")
            elif cancelled:
                span.set_attribute("meshserve.cancelled", True)
            span.end()
            step.span = None


class FeedThread:
    """The blocking client's feed: a :class:`FeedClient` on its own asyncio loop in a daemon
    thread (started by :meth:`start`, stopped by :meth:`close`)."""

    def __init__(self, make: Callable[[], FeedClient], core: RoutedCore) -> None:
        self._make = make
        self._core = core
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="meshserve-feed", daemon=True
        )

    def start(self) -> concurrent.futures.Future[None]:
        """Start the loop and the feed; the future is done when the first view arrived (or
        :data:`FIRST_WAIT_S` passed)."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._begin(), self._loop)

    async def _begin(self) -> None:
        feed = self._make()
        self._core.attach(feed)
        feed.start()
        await warm(feed)

    def close(self, timeout: float = 5.0) -> None:
        feed = self._core.feed
        loop = self._loop
        if not self._thread.is_alive():
            loop.close()
            return
        if feed is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(feed.close(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            loop.close()


async def warm(feed: FeedClient) -> None:
    """Wait for the feed's first view at most :data:`FIRST_WAIT_S` (it keeps connecting)."""
    try:
        await feed.wait_ready(FIRST_WAIT_S)
    except StatusError as exc:
        _log.info("routing through the gateway for now: %s", exc.message)
