"""One outbound stream from the node to one control-plane replica, kept alive.

Contract:

* :meth:`Link.start` runs the link until :meth:`Link.close`: dial, send a Hello carrying the
  node's complete state, read the Welcome, then serve the stream; when it ends or fails, wait a
  full-jitter exponential backoff (reset after a stream that lived 10 s) and dial again. A lost
  message costs nothing: the next Hello re-synchronises everything.
* A replica that already has a connected link from this node is not linked twice: the second
  link raises :class:`DuplicateLink` inside its session and stands by (longer backoff).
* Control messages are dispatched in arrival order: Load and Unload to the copy manager (an
  Unload runs as a task so the stream keeps reading), tunneled queries to the inference handler
  (at most ``max_in_flight`` at once; above it the query is answered RESOURCE_EXHAUSTED at
  once), Welcome and ReplicaSet to the agent's replica list, Feedback to the prediction log,
  TenantRights to the agent's :class:`~meshserve.node.rights.Rights` (the direct port's rules).
* Without TLS, a link that carries a join token dials only loopback replicas, with gRPC local
  credentials (which refuse any other peer, whatever a name resolves to), the SDK's guard for
  its secrets; another address is refused with a clear error (:class:`PlaintextJoinRefused`,
  logged, retried with the backoff) unless the agent was told ``insecure_join``.
* A link whose replica the agent no longer lists (:meth:`Agent.wants`) stops when its stream
  ends instead of dialling again (:meth:`Agent.retire`); :meth:`Link.stop` stops it at once.
* Everything the node sends goes through one bounded outbox; a replica that stops reading fills
  it and the stream is reset rather than buffered without bound. An answer over the link's
  message limit is replaced by a RESOURCE_EXHAUSTED status for that query alone.
* Telemetry: the offline backlog is written first (oldest first; what was not written is handed
  back to the agent's buffer), then at most one message per interval, on change: the link's own
  :class:`~meshserve.node.telemetry.ChangeFilter` (reset at each connect, so the first message
  is full) picks what changed from the tick's summary, or nothing, and the link's
  :class:`~meshserve.node.telemetry.TelemetryBudget` bounds it; each drift window is sent once
  per link.

The node-wide state (copies, labels, the replica list, the offline buffer) belongs to
:class:`~meshserve.node.agent.Agent`; a link reads it and never outlives it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from typing import TYPE_CHECKING

import grpc
from grpc import aio

from meshserve.common.errors import EOF, wire_status
from meshserve.common.security import is_loopback_target
from meshserve.common.tenancy import set_tenant
from meshserve.common.tracing import context_from_map
from meshserve.common.tunneling import MAX_FRAMES, take_frames
from meshserve.node.metrics import node_metrics
from meshserve.node.telemetry import ChangeFilter, TelemetryBudget, wire_size
from meshserve.protos import mesh_pb2, mesh_pb2_grpc

if TYPE_CHECKING:
    from meshserve.node.agent import Agent

__all__ = [
    "DIRECT_MIN_PING_MS",
    "MIN_KEEPALIVE_MS",
    "DuplicateLink",
    "Link",
    "PlaintextJoinRefused",
    "channel_options",
    "direct_server_options",
    "link_credentials",
]

_log = logging.getLogger("meshserve.node.agent")


#: The node never pings a replica more often than this (the replica accepts twice as often).
MIN_KEEPALIVE_MS = 500


def channel_options(max_message_bytes: int, keepalive_ms: int = 10_000) -> list[tuple[str, int]]:
    """Client-side channel options: keepalive pings notice a dead path (a NAT mapping lost, a cut
    link) in ``keepalive_ms`` to ``keepalive_ms`` x 1.5, and keep NAT mappings alive on idle
    streams; ``keepalive_ms`` is at least :data:`MIN_KEEPALIVE_MS`."""
    keepalive_ms = max(MIN_KEEPALIVE_MS, keepalive_ms)
    return [
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", max(1000, keepalive_ms // 2)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


#: The node's direct port accepts keepalive pings this often, with or without calls in flight.
#: gRPC's server default (one ping per 5 minutes without data, then GOAWAY ENHANCE_YOUR_CALM
#: "too_many_pings") refused the gateways' keepalive; they ping at most every
#: ``controlplane.link.options.NODE_PING_FLOOR_MS`` (twice this: timer jitter is no strike).
DIRECT_MIN_PING_MS = 500


def direct_server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Server options of the node's direct OIP port (``--listen``): the message limit, and a
    ping policy that accepts the gateways' and SDKs' keepalive on idle channels."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", DIRECT_MIN_PING_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


class DuplicateLink(Exception):
    """This link reached a replica the node already holds a stream to."""


class PlaintextJoinRefused(Exception):
    """A join token would cross the network in the clear (no TLS, a non-loopback replica)."""


def link_credentials(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    *,
    join_token: bool,
    insecure_join: bool = False,
) -> grpc.ChannelCredentials | None:
    """What a link dials ``address`` with: the TLS ``credentials`` when given; without them and
    with a ``join_token`` to send, gRPC local credentials (loopback peers only) unless
    ``insecure_join``; None: a plain insecure channel. Raises :class:`PlaintextJoinRefused` for
    a join token, no TLS and an address that is not loopback."""
    if credentials is not None or not join_token or insecure_join:
        return credentials
    if not is_loopback_target(address):
        raise PlaintextJoinRefused(
            f"not sending the join token to {address} in the clear: dial the control plane "
            "with TLS (--tls-ca), or pass --insecure-join to accept that risk"
        )
    return grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)


class Link:
    """One stream to one replica, reconnected for as long as the node runs."""

    def __init__(self, agent: Agent, address: str) -> None:
        self._agent = agent
        self.address = address
        self.replica_id = ""
        self.connected = False
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[mesh_pb2.NodeMessage] = asyncio.Queue(maxsize=4096)
        self._call: aio.StreamStreamCall | None = None  # type: ignore[type-arg]
        self._inflight: set[asyncio.Task[None]] = set()
        self.budget = TelemetryBudget(agent.telemetry_max_bytes_per_s)
        self.changes = ChangeFilter(agent.telemetry_heartbeat_s)
        self.telemetry_bytes_sent = 0
        self.telemetry_messages_sent = 0
        self.windows_sent: dict[tuple[str, str], int] = {}  # newest drift window sent per copy

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"link {self.address}")

    @property
    def done(self) -> bool:
        """Whether the link's task has ended (stopped, or retired after its replica left)."""
        return self._task is not None and self._task.done()

    def stop(self) -> None:
        """Cancel the link's task (not awaited: :meth:`close` awaits it)."""
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        base, cap = self._agent.backoff
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self._session()
                _log.info("stream to %s ended", self.address)
            except DuplicateLink:
                _log.info(
                    "%s is replica %s, already linked; standing by", self.address, self.replica_id
                )
                attempt = max(attempt, 5)
            except aio.AioRpcError as exc:
                _log.info(
                    "stream to %s failed: %s %s", self.address, exc.code().name, exc.details()
                )
            except (OSError, TimeoutError, ConnectionError) as exc:
                _log.info("stream to %s failed: %r", self.address, exc)
            except PlaintextJoinRefused as exc:
                _log.error("%s", exc)
            if not self._agent.wants(self.address):  # its replica left the mesh
                self._agent.retire(self)
                return
            if time.monotonic() - started > 10.0:
                attempt = 0
            delay = random.uniform(0.0, min(cap, base * (2**attempt)))  # full jitter
            attempt += 1
            self.reconnects += 1
            node_metrics().reconnected(self.address)
            await asyncio.sleep(delay)

    def say_draining(self) -> None:
        self._offer(
            mesh_pb2.NodeMessage(draining=mesh_pb2.Draining(timeout_ms=self._agent.draining_ms))
        )

    def _offer(self, message: mesh_pb2.NodeMessage) -> None:
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            # The replica is not reading: drop the stream; the next Hello re-syncs everything.
            _log.warning("outbox to %s full; resetting the stream", self.address)
            if self._call is not None:
                self._call.cancel()

    async def _session(self) -> None:
        agent = self._agent
        options = channel_options(agent.max_message_bytes, agent.keepalive_ms)
        credentials = link_credentials(
            self.address,
            agent.credentials,
            join_token=agent.connect_metadata is not None,
            insecure_join=agent.insecure_join,
        )
        if credentials is None:
            channel = aio.insecure_channel(self.address, options=options)
        else:
            channel = aio.secure_channel(self.address, credentials, options=options)
        async with channel:
            stub = mesh_pb2_grpc.NodeLinkStub(channel)
            call = stub.Connect(metadata=agent.connect_metadata)
            self._call = call
            self._outbox = asyncio.Queue(maxsize=4096)
            tasks: list[asyncio.Task[None]] = []
            unsubscribe = None
            backlog: list[mesh_pb2.Telemetry] = []
            try:
                await call.write(mesh_pb2.NodeMessage(hello=agent.hello()))
                first = await asyncio.wait_for(call.read(), timeout=15.0)
                if first is EOF or not first.HasField("welcome"):
                    raise ConnectionError("the control plane did not answer with a Welcome")
                welcome = first.welcome
                self.replica_id = welcome.replica_id
                batches = welcome.tunnel_batches  # answers that waited together: one message
                if self.replica_id in agent.connected_replicas(exclude=self):
                    raise DuplicateLink
                self.connected = True
                _log.info("linked to replica %s at %s", self.replica_id, self.address)
                agent.learn(welcome.replicas)
                unsubscribe = agent.copies.subscribe(
                    lambda st: self._offer(mesh_pb2.NodeMessage(copy_status=st))
                )
                interval = (welcome.telemetry_interval_ms or 2000) / 1000.0
                agent.telemetry_interval_s = interval
                backlog = agent.offline.drain()  # summaries made offline: sent first
                if backlog:
                    _log.info("sending %d telemetry summaries buffered offline", len(backlog))
                if agent.draining_ms:
                    self.say_draining()
                tasks.append(asyncio.create_task(self._write_loop(call, backlog, batches)))
                tasks.append(asyncio.create_task(self._telemetry_loop(interval)))
                while True:
                    message = await call.read()
                    if message is EOF:
                        return
                    self._dispatch(message)
            finally:
                self.connected = False
                self._call = None
                if unsubscribe is not None:
                    unsubscribe()
                for t in tasks + list(self._inflight):
                    t.cancel()
                await asyncio.gather(*tasks, *self._inflight, return_exceptions=True)
                self._inflight.clear()
                if backlog:  # not all written: keep them for the next link
                    agent.offline.requeue(backlog)
                call.cancel()

    def _dispatch(self, message: mesh_pb2.ControlMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "infer_request":
            self._tunneled(message.infer_request)
        elif kind == "infer_batch":
            for frame in message.infer_batch.frames:
                self._tunneled(frame)
        elif kind == "load":
            self._agent.copies.load(message.load)
        elif kind == "unload":
            task = asyncio.create_task(
                self._agent.copies.unload(
                    message.unload.model,
                    message.unload.variant,
                    message.unload.placement_revision,
                    message.unload.store_id,
                )
            )
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        elif kind == "welcome":
            self._agent.learn(message.welcome.replicas)
        elif kind == "replicas":
            self._agent.learn(message.replicas.replicas)
        elif kind == "feedback":
            self._agent.join_feedback(message.feedback)
        elif kind == "tenants":
            self._agent.rights.update(message.tenants)

    def _tunneled(self, req: mesh_pb2.TunnelRequest) -> None:
        if len(self._inflight) >= self._agent.max_in_flight:
            self._offer(
                mesh_pb2.NodeMessage(
                    infer_response=mesh_pb2.TunnelResponse(
                        correlation_id=req.correlation_id,
                        status_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                        status_message=f"node {self._agent.node_id} has "
                        f"{self._agent.max_in_flight} queries in flight; retry later",
                    )
                )
            )
            return
        task = asyncio.create_task(self._answer(req))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _answer(self, req: mesh_pb2.TunnelRequest) -> None:
        message = mesh_pb2.NodeMessage()  # the answer built in place: copied once
        out = message.infer_response
        out.correlation_id = req.correlation_id
        parent = context_from_map(req.trace_context)
        timeout = req.timeout_ms / 1000.0 if req.timeout_ms else None
        # whose query (its prediction's tenant): the caller the replica names
        set_tenant(self._agent.rights.forwarded(req.trace_context.items()))
        try:
            deadline = time.monotonic() + timeout if timeout is not None else None
            response = await asyncio.wait_for(
                self._agent.handler.infer(req.request, parent, hop="tunnel", deadline=deadline),
                timeout,
            )
            out.response.CopyFrom(response)
        except TimeoutError:
            out.status_code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            out.status_message = f"deadline of {req.timeout_ms} ms exceeded on the node"
        except Exception as exc:
            out.status_code, out.status_message = wire_status(exc)
        # An answer over the link's message limit would end the link: send the error instead.
        limit = self._agent.max_message_bytes
        if out.response.ByteSize() > limit - 4096 and message.ByteSize() > limit:
            message = mesh_pb2.NodeMessage(
                infer_response=mesh_pb2.TunnelResponse(
                    correlation_id=req.correlation_id,
                    status_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                    status_message=f"the answer is {message.ByteSize()} bytes, over the "
                    f"{limit}-byte message limit of node {self._agent.node_id}'s link",
                )
            )
        self._offer(message)

    async def _write_loop(
        self,
        call: aio.StreamStreamCall,  # type: ignore[type-arg]
        backlog: list[mesh_pb2.Telemetry],
        batches: bool = False,
    ) -> None:
        """Write the offline backlog (oldest first, removed from ``backlog`` once written), then
        the outbox; with ``batches`` (the replica reads them), tunneled answers that waited
        together go in one message (common/tunneling.py)."""
        while backlog:
            await call.write(mesh_pb2.NodeMessage(telemetry=backlog[0]))
            self.telemetry_bytes_sent += wire_size(backlog.pop(0))
            self.telemetry_messages_sent += 1
        outbox = self._outbox
        ready: collections.deque[mesh_pb2.NodeMessage] = collections.deque()
        while True:
            if not ready:
                ready.append(await outbox.get())
            while batches and not outbox.empty() and len(ready) < MAX_FRAMES:
                ready.append(outbox.get_nowait())  # what waited too: merged where it can be
            message = (
                take_frames(ready, "infer_response", "infer_answers")
                if batches
                else ready.popleft()
            )
            await call.write(message)
            if message.HasField("telemetry"):
                self.telemetry_bytes_sent += wire_size(message.telemetry)
                self.telemetry_messages_sent += 1

    async def _telemetry_loop(self, interval: float) -> None:
        """One tick per ``interval``: the summary, what changed of it (nothing: no message), then
        the budget; the first message after the connect is full."""
        self.changes.reset()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            offered = self.changes.select(self._agent.summarise(self.windows_sent), now)
            if offered is None:
                continue
            telemetry = self.budget.apply(offered, interval)
            if telemetry is None:
                continue  # the budget skipped this tick: everything stays due
            telemetry = self.changes.sent(telemetry, now, trimmed=self.budget.last_dropped > 0)
            for m in telemetry.models:
                if m.HasField("drift"):
                    self.windows_sent[(m.model, m.variant)] = m.drift.seq
            self._offer(mesh_pb2.NodeMessage(telemetry=telemetry))
