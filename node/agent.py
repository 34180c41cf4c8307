"""The node's outbound links to the control plane: one bidirectional stream per replica.

Contract: the node dials out (no inbound port needed). Each :class:`_Link` keeps one stream to one
replica alive, reconnecting with exponential backoff and full jitter. The first message on every
stream is a Hello carrying the node's complete state (labels, hardware, copies), so a reconnect
re-synchronises everything and a lost status message costs nothing. Replicas named in a Welcome
that the node has no stream to yet get a link of their own; a second link to a replica that
already has one closes itself.

Telemetry is bounded per link by a :class:`~meshserve.node.telemetry.TelemetryBudget`; the agent
counts the
telemetry bytes each link wrote (:attr:`Agent.telemetry_bytes_sent`). While no link is connected
the node keeps summarising into a bounded :class:`~meshserve.node.telemetry.OfflineBuffer`; the
first link
to connect sends those summaries first, oldest first, then live telemetry resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Sequence

import grpc
from grpc import aio

from meshserve.common.errors import EOF, wire_status
from meshserve.common.security import JOIN_TOKEN_HEADER, TLSFiles, channel_credentials
from meshserve.common.tracing import context_from_map
from meshserve.node.copies import CopyManager
from meshserve.node.metrics import node_metrics
from meshserve.node.runtime import available_providers, resident_bytes
from meshserve.node.service import InferenceHandler
from meshserve.node.telemetry import OfflineBuffer, TelemetryBudget, wire_size
from meshserve.protos import mesh_pb2, mesh_pb2_grpc

__all__ = ["Agent", "channel_options"]

_log = logging.getLogger("meshserve.node.agent")


def channel_options(max_message_bytes: int, keepalive_ms: int = 10_000) -> list[tuple[str, int]]:
    """Client-side channel options: keepalive pings notice a dead path (a NAT mapping lost, a cut
    link) in about ``keepalive_ms`` x 1.5, and keep NAT mappings alive on idle streams."""
    return [
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", max(1000, keepalive_ms // 2)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _DuplicateLink(Exception):
    pass


class Agent:
    def __init__(
        self,
        *,
        node_id: str,
        labels: dict[str, str],
        direct_address: str,
        seeds: Sequence[str],
        copies: CopyManager,
        handler: InferenceHandler,
        max_message_bytes: int,
        max_in_flight: int = 1024,
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 10.0,
        memory_bytes: int = 0,
        keepalive_ms: int = 10_000,
        telemetry_max_bytes_per_s: int = 2048,
        telemetry_buffer_bytes: int = 64 << 10,
        telemetry_log_s: float = 0.0,
        tls: TLSFiles | None = None,
        join_token: str | None = None,
    ) -> None:
        """``memory_bytes``: memory offered to the mesh for model copies (0: all of the
        machine's, as /proc/meminfo reports it). ``telemetry_max_bytes_per_s``: the telemetry
        budget of each link (0: unbounded); ``telemetry_buffer_bytes``: the bound of the offline
        buffer; ``telemetry_log_s``: log the telemetry bytes each link sent this often (0: never).
        ``tls``: dial the replicas with TLS (their CA; this node's certificate, which must name
        its id); ``join_token``: sent on every Connect (metadata ``x-meshserve-join-token``).
        """
        self.credentials = channel_credentials(tls)
        self.connect_metadata = ((JOIN_TOKEN_HEADER, join_token),) if join_token else None
        self.node_id = node_id
        self.labels = labels
        self.direct_address = direct_address
        self._seeds = list(dict.fromkeys(seeds))
        self.copies = copies
        self.handler = handler
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max_in_flight
        self.backoff = (backoff_base_s, backoff_cap_s)
        self.keepalive_ms = keepalive_ms
        self.telemetry_max_bytes_per_s = telemetry_max_bytes_per_s
        self.telemetry_log_s = telemetry_log_s
        self.offline = OfflineBuffer(telemetry_buffer_bytes)
        # the interval the control plane asks for; the last Welcome's (before any: the default)
        self.telemetry_interval_s = 2.0
        self._links: dict[str, _Link] = {}
        self._closing = False
        self.draining_ms = 0  # > 0 once the node is shutting down (SIGTERM): told to every link
        self._tasks: list[asyncio.Task[None]] = []
        self.hardware = mesh_pb2.Hardware(
            cpu_cores=os.cpu_count() or 1,
            memory_bytes=memory_bytes or _memory_bytes(),
            execution_providers=available_providers(),
        )
        node_metrics().watch_telemetry(self)

    def start(self) -> None:
        for address in self._seeds:
            self._spawn(address)
        self._tasks.append(asyncio.create_task(self._offline_loop(), name="telemetry offline"))
        if self.telemetry_log_s > 0:
            self._tasks.append(asyncio.create_task(self._log_loop(), name="telemetry log"))

    def _spawn(self, address: str) -> None:
        if self._closing or address in self._links:
            return
        link = _Link(self, address)
        self._links[address] = link
        link.start()

    def hello(self) -> mesh_pb2.Hello:
        return mesh_pb2.Hello(
            node_id=self.node_id,
            labels=self.labels,
            hardware=self.hardware,
            direct_address=self.direct_address,
            version="0.1.0",
            copies=self.copies.statuses(),
        )

    def connected_replicas(self, exclude: _Link | None = None) -> set[str]:
        return {
            link.replica_id
            for link in self._links.values()
            if link is not exclude and link.connected and link.replica_id
        }

    def drain(self, timeout_s: float) -> None:
        """Tell every replica (now, and any linked later) that this node is shutting down."""
        self.draining_ms = max(1, int(timeout_s * 1000))
        for link in list(self._links.values()):
            if link.connected:
                link.say_draining()

    def learn(self, replicas: Sequence[mesh_pb2.ReplicaInfo]) -> None:
        held = self.connected_replicas()
        for info in replicas:
            if info.replica_id not in held and info.address:
                self._spawn(info.address)

    @property
    def links(self) -> dict[str, _Link]:
        return dict(self._links)

    @property
    def telemetry_bytes_sent(self) -> dict[str, int]:
        """Telemetry bytes written per link (by address), as :func:`wire_size` counts them."""
        return {address: link.telemetry_bytes_sent for address, link in self._links.items()}

    def summarise(
        self, windows_sent: dict[tuple[str, str], int] | None = None
    ) -> mesh_pb2.Telemetry:
        """One Telemetry: the node's counters now, one aggregate entry per copy. With
        ``windows_sent`` (a link's newest drift window sequence per copy), each entry also
        carries the copy's newest closed drift window that link has not sent."""
        telemetry = mesh_pb2.Telemetry(unix_ms=int(time.time() * 1000), rss_bytes=resident_bytes())
        cache = self.copies.cache.stats()
        log = self.copies.prediction_log
        for e in self.copies.entries():
            model = telemetry.models.add(
                model=e.model,
                variant=e.variant,
                in_flight=e.in_flight,
                requests=e.requests,
                errors=e.errors,
                cache_hits=cache.hits,
                cache_misses=cache.misses,
            )
            if e.batcher is not None:
                stats = e.batcher.stats
                model.queue_depth = e.batcher.queue_depth
                model.batches = stats.batches
                model.batched_rows = stats.rows
                model.max_batch_size = e.batcher.current_max_batch_size
            if e.monitor is not None and windows_sent is not None:
                window = e.monitor.window_after(windows_sent.get((e.model, e.variant), 0))
                if window is not None:
                    model.drift.CopyFrom(window)
            counts = log.counts.get((e.model, e.variant)) if log is not None else None
            if counts is not None:
                model.feedback_joined = counts.joined
                model.feedback_correct = counts.correct
                model.feedback_abs_error = counts.abs_error
                model.predictions_logged = counts.logged
        return telemetry

    def join_feedback(self, batch: mesh_pb2.FeedbackBatch) -> int:
        """Join outcomes to this node's logged predictions; returns how many joined."""
        log = self.copies.prediction_log
        if log is None:
            return 0
        return sum(log.join(batch.model, item) for item in batch.items)

    async def _offline_loop(self) -> None:
        """While no link is connected, summarise into the offline buffer (under the budget)."""
        budget = TelemetryBudget(self.telemetry_max_bytes_per_s)
        while True:
            interval = self.telemetry_interval_s
            await asyncio.sleep(interval)
            if self.connected_replicas():
                continue
            telemetry = budget.apply(self.summarise(), interval)
            if telemetry is not None:
                self.offline.append(telemetry)

    async def _log_loop(self) -> None:
        """Log, per link, the telemetry bytes it wrote since the last line."""
        last: dict[str, int] = {}
        since = time.monotonic()
        while True:
            await asyncio.sleep(self.telemetry_log_s)
            now = time.monotonic()
            for address, link in list(self._links.items()):
                total = link.telemetry_bytes_sent
                sent = total - last.get(address, 0)
                last[address] = total
                if not sent and not link.connected:
                    continue
                _log.info(
                    "telemetry: %d bytes in %.3f s to %s (%d total; %d entries dropped, "
                    "%d drift windows left out, %d ticks skipped; %d buffered offline)",
                    sent,
                    now - since,
                    address,
                    total,
                    link.budget.dropped_entries,
                    link.budget.dropped_windows,
                    link.budget.skipped,
                    len(self.offline),
                )
            since = now

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        links = list(self._links.values())
        await asyncio.gather(
            *self._tasks, *(link.close() for link in links), return_exceptions=True
        )


class _Link:
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
        self.telemetry_bytes_sent = 0
        self.windows_sent: dict[tuple[str, str], int] = {}  # newest drift window sent per copy

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"link {self.address}")

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
            except _DuplicateLink:
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
        if agent.credentials is None:
            channel = aio.insecure_channel(self.address, options=options)
        else:
            channel = aio.secure_channel(self.address, agent.credentials, options=options)
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
                if self.replica_id in agent.connected_replicas(exclude=self):
                    raise _DuplicateLink
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
                tasks.append(asyncio.create_task(self._write_loop(call, backlog)))
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
        elif kind == "load":
            self._agent.copies.load(message.load)
        elif kind == "unload":
            task = asyncio.create_task(
                self._agent.copies.unload(
                    message.unload.model,
                    message.unload.variant,
                    message.unload.placement_revision,
                )
            )
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        elif kind == "welcome":
            self._agent.learn(message.welcome.replicas)
        elif kind == "feedback":
            self._agent.join_feedback(message.feedback)

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
        out = mesh_pb2.TunnelResponse(correlation_id=req.correlation_id)
        parent = context_from_map(req.trace_context)
        timeout = req.timeout_ms / 1000.0 if req.timeout_ms else None
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
        message = mesh_pb2.NodeMessage(infer_response=out)
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
    ) -> None:
        """Write the offline backlog (oldest first, removed from ``backlog`` once written), then
        the outbox."""
        while backlog:
            await call.write(mesh_pb2.NodeMessage(telemetry=backlog[0]))
            self.telemetry_bytes_sent += wire_size(backlog.pop(0))
        while True:
            message = await self._outbox.get()
            await call.write(message)
            if message.HasField("telemetry"):
                self.telemetry_bytes_sent += wire_size(message.telemetry)

    async def _telemetry_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            telemetry = self.budget.apply(self._agent.summarise(self.windows_sent), interval)
            if telemetry is not None:
                for m in telemetry.models:
                    if m.HasField("drift"):
                        self.windows_sent[(m.model, m.variant)] = m.drift.seq
                self._offer(mesh_pb2.NodeMessage(telemetry=telemetry))
