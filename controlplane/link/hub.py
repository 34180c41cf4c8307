"""Session hub: the control-plane side of every node's NodeLink stream.

Contract:
- A node's link record (``nodes/<node>/<replica>``) exists exactly while the stream is alive:
  it is written when the Hello arrives and deleted (retried until etcd confirms) when the stream
  ends. It is attached to this replica's own lease — one lease per replica, not per node, so
  10,000 streams cost one keep-alive — and so expires within the TTL if the replica dies. A
  sweeper deletes any record of this replica that no live stream backs (e.g. after etcd was
  unreachable when a stream ended).
- One stream per node per replica: a second concurrent stream is refused with ALREADY_EXISTS.
- New streams are admitted at a bounded rate (token bucket, ``admissions_per_s``); the excess
  is refused with UNAVAILABLE and retries with the node's jittered backoff (reconnect storms).
- :meth:`NodeSession.tunnel` multiplexes queries down the stream with correlation ids; each waits
  for its answer at most until its deadline, and every pending query fails with UNAVAILABLE the
  moment the stream ends. The outgoing queue is bounded (RESOURCE_EXHAUSTED when full), and so
  is each frame: a query too big for the stream's message limit is refused (RESOURCE_EXHAUSTED)
  rather than sent, which would end the stream. A message that does not decode is dropped.
- :meth:`Hub.reconcile` sends Load for placed variants a node does not hold and Unload for copies
  no placement wants; commands are idempotent on the node, so resending is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from functools import partial
from typing import Any

import grpc

from meshserve.common.errors import (
    EOF,
    DeadlineExceeded,
    Malformed,
    ResourceExhausted,
    ServicerContext,
    Unavailable,
    from_code,
)
from meshserve.common.sketches import monitoring_digest
from meshserve.controlplane import keys
from meshserve.controlplane.observe.metrics import controlplane_metrics
from meshserve.controlplane.registry import Registry
from meshserve.controlplane.snapshot import Snapshot, VariantKey
from meshserve.protos import inference_pb2, mesh_pb2, mesh_pb2_grpc

__all__ = ["Hub", "NodeSession", "TokenBucket"]

_log = logging.getLogger("meshserve.controlplane.hub")
ADOPTION_GRACE_S = 5.0  # a reconnected node's unplaced READY copies wait this long for adoption
_FRAME_SLACK = 4096  # framing a query for the tunnel adds less than this (ids, trace context)
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up (pure; injectable clock)."""

    def __init__(
        self, *, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._when = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._when) * self.rate)
        self._when = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def _awaits_replacement(snapshot: Snapshot, node_id: str, key: VariantKey) -> bool:
    """Make before break: a draining node's READY copy stays until the copies that replace it
    are READY (as many as the placement names elsewhere, at least one), so a drain never
    leaves a variant without a ready copy; the gateway routes to it only while it is the last."""
    if node_id not in snapshot.draining:
        return False
    placement = snapshot.placements.get(key)
    if placement is None:
        return False  # the variant was removed: nothing to hand over
    others = [n for n in placement.nodes if n != node_id and n not in snapshot.draining]
    ready = {n.node_id for n in snapshot.ready_nodes(key)}
    want = max(1, min(len(others), placement.desired_copies or len(others)))
    return sum(n in ready for n in others) < want


class NodeSession:
    """One live stream from one node."""

    def __init__(
        self,
        hello: mesh_pb2.Hello,
        replica_id: str,
        outbox_size: int,
        max_message_bytes: int = 64 << 20,
    ) -> None:
        self.hello = hello
        self.max_message_bytes = max_message_bytes
        self.node_id = hello.node_id
        self.replica_id = replica_id
        self.copies: dict[VariantKey, mesh_pb2.CopyStatus] = {
            (c.model, c.variant): c for c in hello.copies
        }
        self.telemetry = mesh_pb2.Telemetry()
        self._by_copy: dict[VariantKey, mesh_pb2.ModelTelemetry] = {}
        self.outbox: asyncio.Queue[mesh_pb2.ControlMessage] = asyncio.Queue(maxsize=outbox_size)
        self.pending: dict[int, asyncio.Future[mesh_pb2.TunnelResponse]] = {}
        self.sent: dict[VariantKey, str] = {}  # last command per variant: "load:<sha>" / "unload"
        self.record_dirty = asyncio.Event()
        self.record_dirty.set()
        self.started = time.monotonic()
        self._ids = itertools.count(1)
        self.closed = False
        self.draining = False  # the node said it is shutting down

    def observe(self, telemetry: mesh_pb2.Telemetry) -> None:
        """The node's latest telemetry, indexed by copy for the query path."""
        self.telemetry = telemetry
        self._by_copy = {(m.model, m.variant): m for m in telemetry.models}

    def copy_telemetry(self, key: VariantKey) -> mesh_pb2.ModelTelemetry | None:
        """The latest telemetry entry of one copy (None: none reported)."""
        return self._by_copy.get(key)

    def record(self) -> mesh_pb2.NodeInfo:
        return mesh_pb2.NodeInfo(
            node_id=self.node_id,
            labels=self.hello.labels,
            hardware=self.hello.hardware,
            direct_address=self.hello.direct_address,
            replicas=[self.replica_id],
            copies=list(self.copies.values()),
        )

    def send(self, message: mesh_pb2.ControlMessage) -> None:
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            raise ResourceExhausted(
                f"the stream to node {self.node_id} is backed up; retry later"
            ) from None

    async def tunnel(
        self,
        request: inference_pb2.ModelInferRequest,
        timeout: float | None,
        trace_context: dict[str, str],
    ) -> inference_pb2.ModelInferResponse:
        if self.closed:
            raise Unavailable(f"node {self.node_id} disconnected")
        correlation_id = next(self._ids)
        future: asyncio.Future[mesh_pb2.TunnelResponse] = asyncio.get_running_loop().create_future()
        frame = mesh_pb2.TunnelRequest(
            correlation_id=correlation_id,
            request=request,
            trace_context=trace_context,
            timeout_ms=int(timeout * 1000) if timeout is not None else 0,
        )
        message = mesh_pb2.ControlMessage(infer_request=frame)
        # A frame over the stream's message limit would end the stream (every query on it
        # fails and the node drops out): refuse the query instead. Exact size only when close.
        if request.ByteSize() > self.max_message_bytes - _FRAME_SLACK:
            size = message.ByteSize()
            if size > self.max_message_bytes:
                raise ResourceExhausted(
                    f"the query is {size} bytes once framed for the tunnel to node "
                    f"{self.node_id}, over its limit of {self.max_message_bytes} bytes; "
                    "send a smaller request"
                )
        self.pending[correlation_id] = future
        try:
            self.send(message)
            answer = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no answer from node {self.node_id} within the deadline"
            ) from None
        finally:
            self.pending.pop(correlation_id, None)
        if answer.status_code:
            raise from_code(answer.status_code, answer.status_message)
        return answer.response

    def resolve(self, answer: mesh_pb2.TunnelResponse) -> None:
        future = self.pending.get(answer.correlation_id)
        if future is not None and not future.done():
            future.set_result(answer)

    def fail_pending(self) -> None:
        self.closed = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(Unavailable(f"node {self.node_id} disconnected"))
        self.pending.clear()


class Hub(mesh_pb2_grpc.NodeLinkServicer):
    def __init__(
        self,
        *,
        registry: Registry,
        replica_id: str,
        lease_ttl_s: int,
        lease_id: Callable[[], int],
        snapshot: Callable[[], Snapshot],
        replicas: Callable[[], list[mesh_pb2.ReplicaInfo]],
        telemetry_interval_ms: int = 2000,
        outbox_size: int = 4096,
        max_message_bytes: int = 64 << 20,
        hello_timeout_s: float = 10.0,
        admissions_per_s: float = 200.0,
        on_telemetry: Callable[[str, mesh_pb2.Telemetry], None] | None = None,
        identify: Callable[[ServicerContext, str], None] | None = None,
    ) -> None:
        """``on_telemetry``: called with every Telemetry a node sends (drift windows).
        ``identify``: checks that the caller may claim the Hello's node id (raising the status
        that refuses the stream; :meth:`meshserve.controlplane.auth.Guard.identify_node`); None:
        trusted."""
        self._registry = registry
        self._on_telemetry = on_telemetry
        self._identify = identify
        self._digests: dict[VariantKey, tuple[mesh_pb2.ModelSpec, str]] = {}
        self.replica_id = replica_id
        self._ttl = lease_ttl_s
        self._lease_id = lease_id
        self._snapshot = snapshot
        self._replicas = replicas
        self._telemetry_interval_ms = telemetry_interval_ms
        self._outbox_size = outbox_size
        self._max_message_bytes = max_message_bytes
        self._hello_timeout = hello_timeout_s
        self.admission = TokenBucket(rate=admissions_per_s, burst=max(1.0, admissions_per_s))
        self.sessions: dict[str, NodeSession] = {}
        self._cleanups: dict[str, asyncio.Future[None]] = {}
        self._background: set[asyncio.Future[None]] = set()
        controlplane_metrics().watch_streams(self)

    # -- the stream --------------------------------------------------------------------------

    async def Connect(
        self, request_iterator: AsyncIterator[mesh_pb2.NodeMessage], context: ServicerContext
    ) -> None:  # type: ignore[override]
        try:
            first = await asyncio.wait_for(context.read(), self._hello_timeout)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the first NodeMessage must be a Hello, sent at once",
            )
            return
        if first is EOF or isinstance(first, Malformed) or not first.HasField("hello"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first NodeMessage must be a Hello"
            )
            return
        hello = first.hello
        if not _NODE_ID.match(hello.node_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid node_id {hello.node_id!r}: 1-128 of [A-Za-z0-9_.:-], "
                "starting with a letter or digit",
            )
            return
        if self._identify is not None:
            self._identify(context, hello.node_id)  # a refusal ends the stream with its status
        if not self.admission.take():
            # A reconnect storm (a region back from an outage): nodes retry with jittered
            # backoff, so refusing the excess spreads them out instead of stalling everyone.
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"replica {self.replica_id} admits {self.admission.rate:g} new streams/s; "
                "retry with backoff",
            )
            return
        if hello.node_id in self.sessions:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"node {hello.node_id} already has a live stream to replica {self.replica_id}",
            )
            return
        session = NodeSession(hello, self.replica_id, self._outbox_size, self._max_message_bytes)
        self.sessions[hello.node_id] = session
        if hello.node_id in self._snapshot().draining:  # back from a shutdown drain: clear it
            self._spawn(self._mark_draining(hello.node_id, False))
        tasks: list[asyncio.Task[None]] = []
        try:
            previous = self._cleanups.get(hello.node_id)
            if previous is not None:  # the node's last stream is still deleting its record
                await asyncio.shield(previous)
            await self._write_record(session)
            await context.write(
                mesh_pb2.ControlMessage(
                    welcome=mesh_pb2.Welcome(
                        replica_id=self.replica_id,
                        replicas=self._replicas(),
                        lease_ttl_seconds=self._ttl,
                        telemetry_interval_ms=self._telemetry_interval_ms,
                    )
                )
            )
            _log.info(
                "node %s linked (direct=%s, labels=%s)",
                session.node_id,
                hello.direct_address or "-",
                dict(hello.labels),
            )
            tasks = [
                asyncio.create_task(self._write_loop(session, context)),
                asyncio.create_task(self._record_loop(session)),
            ]
            self.reconcile_session(session, self._snapshot())
            while True:
                message = await context.read()
                if message is EOF:
                    break
                if isinstance(message, Malformed):  # did not decode: dropped, the stream lives
                    _log.warning("node %s: %s; ignored", session.node_id, message.reason)
                    continue
                self._on_message(session, message)
        finally:
            session.fail_pending()
            if self.sessions.get(session.node_id) is session:
                del self.sessions[session.node_id]
            # gRPC may cancel this handler more than once; the cleanup runs in its own task so
            # the record is always deleted whatever happens here.
            cleanup = asyncio.ensure_future(self._cleanup(session, tasks))
            self._cleanups[session.node_id] = cleanup
            cleanup.add_done_callback(partial(self._forget_cleanup, session.node_id))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(cleanup)

    def _forget_cleanup(self, node_id: str, done: asyncio.Future[None]) -> None:
        if self._cleanups.get(node_id) is done:
            del self._cleanups[node_id]

    async def _cleanup(self, session: NodeSession, tasks: list[asyncio.Task[None]]) -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for attempt in range(60):  # ~30 s; after that the sweeper takes over
            try:
                await self._registry.delete_node_record(session.node_id, self.replica_id)
                break
            except Exception as exc:
                if attempt == 0:
                    _log.warning(
                        "deleting node %s record failed: %r; retrying", session.node_id, exc
                    )
                await asyncio.sleep(0.5)
        _log.info("node %s unlinked", session.node_id)

    def _on_message(self, session: NodeSession, message: mesh_pb2.NodeMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "infer_response":
            session.resolve(message.infer_response)
        elif kind == "copy_status":
            status = message.copy_status
            key = (status.model, status.variant)
            if status.state == mesh_pb2.UNLOADED:
                session.copies.pop(key, None)
            else:
                session.copies[key] = status
            session.sent.pop(key, None)  # the node acted (or refused): decide afresh
            session.record_dirty.set()
            self.reconcile_session(session, self._snapshot())
        elif kind == "telemetry":
            session.observe(message.telemetry)
            if self._on_telemetry is not None:
                self._on_telemetry(session.node_id, message.telemetry)
        elif kind == "hello":
            _log.warning("node %s sent a second Hello; ignored", session.node_id)
        elif kind == "draining" and not session.draining:
            session.draining = True
            self._spawn(self._mark_draining(session.node_id, True))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _mark_draining(self, node_id: str, on: bool) -> None:
        """A node shutting down drains itself: ``draining/<node>`` = ``keys.SHUTDOWN_DRAIN``
        (under this replica's lease, unless the node is drained already), so the leader moves its
        copies and gateways stop routing to it. Its next Hello (a restart) clears that mark; an
        operator's drain (value "") stays, and is never replaced by a shutdown mark."""
        try:
            if on:
                if await self._registry.mark_shutdown_drain(node_id, self._lease_id()):
                    _log.info("node %s is shutting down: draining it", node_id)
                return
            await self._registry.clear_shutdown_drain(node_id)
        except Exception as exc:
            _log.warning("draining mark of node %s: %r", node_id, exc)

    async def _write_loop(self, session: NodeSession, context: ServicerContext) -> None:
        while True:
            message = await session.outbox.get()
            await context.write(message)

    async def _write_record(self, session: NodeSession) -> None:
        session.record_dirty.clear()
        await self._registry.put_node_record(self.replica_id, session.record(), self._lease_id())

    async def _record_loop(self, session: NodeSession) -> None:
        """Write the link record whenever it changed; coalesces bursts, retries on errors."""
        while True:
            await session.record_dirty.wait()
            try:
                await self._write_record(session)
            except Exception as exc:
                _log.warning("writing node %s record failed: %r", session.node_id, exc)
                session.record_dirty.set()
                await asyncio.sleep(0.5)

    def rewrite_all(self) -> None:
        """Rewrite every record (after this replica's lease was renewed)."""
        for session in self.sessions.values():
            session.record_dirty.set()

    async def sweep(self, links: Mapping[str, int]) -> int:
        """Delete this replica's node records that no live stream backs; returns how many.
        ``links``: every link record's key and mod revision (the mirror); a record is deleted
        only if it is still that revision (a stream that came back meanwhile keeps its own)."""
        stale = []
        for key in links:
            node_id, replica_id = keys.split_key(key, keys.NODES)
            if (
                replica_id == self.replica_id
                and node_id not in self.sessions
                and (node_id not in self._cleanups)
            ):
                stale.append(key)
        swept = 0
        for key in stale:
            node_id, _ = keys.split_key(key, keys.NODES)
            revision = links[key]
            if await self._registry.delete_node_record(
                node_id, self.replica_id, mod_revision=revision
            ):
                swept += 1
                _log.warning("swept stale record %s", key)
        return swept

    # -- reconciliation ----------------------------------------------------------------------

    def reconcile(self, snapshot: Snapshot) -> None:
        for session in list(self.sessions.values()):
            self.reconcile_session(session, snapshot)

    def reconcile_session(self, session: NodeSession, snapshot: Snapshot) -> None:
        """Send the commands that move ``session``'s node towards ``snapshot``'s placements.

        A command is sent once per decision (``session.sent``) and sent again only after the
        node reported on that variant (any CopyStatus clears the mark), so a node that dropped
        or ignored a command is re-told. Every command carries the placement revision it was
        decided on; the node ignores one older than the last it applied, so replicas whose views
        lag a moment behind can never undo a newer decision.
        """
        node_id = session.node_id
        for key, placement in snapshot.placements.items():
            spec = snapshot.models.get(key)
            if spec is None or node_id not in placement.nodes:
                continue
            held = session.copies.get(key)
            revision = snapshot.placement_revision(key)
            digest = self._digest(key, spec)
            command = f"load:{spec.sha256.lower()}:{digest}"
            if (
                held is not None
                and held.sha256 == spec.sha256.lower()
                and (held.monitoring_digest == digest or held.state != mesh_pb2.READY)
            ):
                session.sent[key] = command
                continue
            if session.sent.get(key) == command:
                continue
            with contextlib.suppress(ResourceExhausted):
                session.send(
                    mesh_pb2.ControlMessage(
                        load=mesh_pb2.LoadModel(
                            model=spec.name,
                            variant=spec.variant or key[1],
                            artifact_uri=spec.artifact_uri,
                            sha256=spec.sha256,
                            execution_providers=spec.execution_providers,
                            serving=spec.serving,
                            placement_revision=revision,
                            drift_reference=spec.drift_reference,
                        )
                    )
                )
                session.sent[key] = command
                _log.info("load %s/%s -> node %s (rev %d)", key[0], key[1], node_id, revision)
        for key in list(session.copies):
            current = snapshot.placements.get(key)
            # A copy goes only when its placement is gone or names other nodes; a removed
            # model's placement is deleted by the leader, and that deletion is the decision. In a
            # stream's first seconds, a READY copy of a placement short of copies stays: the
            # leader adopts it (a node back from a network cut keeps serving, nothing is loaded
            # twice); the periodic reconcile unloads it after the grace if it was not adopted.
            short = current is not None and len(current.nodes) < current.desired_copies
            fresh = time.monotonic() - session.started < ADOPTION_GRACE_S
            held = session.copies[key]
            if (
                (current is not None and node_id in current.nodes)
                or (short and fresh and held.state == mesh_pb2.READY)
                or session.sent.get(key) == "unload"
                or (held.state == mesh_pb2.READY and _awaits_replacement(snapshot, node_id, key))
            ):
                continue
            revision = snapshot.placement_revision(key)
            with contextlib.suppress(ResourceExhausted):
                session.send(
                    mesh_pb2.ControlMessage(
                        unload=mesh_pb2.UnloadModel(
                            model=key[0], variant=key[1], placement_revision=revision
                        )
                    )
                )
                session.sent[key] = "unload"
                _log.info("unload %s/%s -> node %s (rev %d)", key[0], key[1], node_id, revision)

    def _digest(self, key: VariantKey, spec: mesh_pb2.ModelSpec) -> str:
        """The monitoring digest a copy of ``spec`` should report (cached per spec object)."""
        cached = self._digests.get(key)
        if cached is not None and cached[0] is spec:
            return cached[1]
        digest = monitoring_digest(spec.serving.monitoring, spec.drift_reference)
        self._digests[key] = (spec, digest)
        return digest

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            session.fail_pending()
        await asyncio.gather(*self._cleanups.values(), *self._background, return_exceptions=True)
