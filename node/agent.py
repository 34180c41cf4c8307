"""The node's outbound links to the control plane: one bidirectional stream per replica.

Contract: the node dials out (no inbound port needed). Each :class:`_Link` keeps one stream to one
replica alive, reconnecting with exponential backoff and full jitter. The first message on every
stream is a Hello carrying the node's complete state (labels, hardware, copies), so a reconnect
re-synchronises everything and a lost status message costs nothing. Replicas named in a Welcome
that the node has no stream to yet get a link of their own; a second link to a replica that
already has one closes itself.
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

from node.copies import CopyManager
from node.runtime import available_providers, resident_bytes
from node.service import InferenceHandler
from protos import mesh_pb2, mesh_pb2_grpc
from protos.status import EOF, wire_status
from protos.tracing import context_from_map

__all__ = ["Agent", "channel_options"]

_log = logging.getLogger("meshserve.node.agent")


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Client-side channel options: keepalive notices a dead path in seconds."""
    return [
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
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
    ) -> None:
        """``memory_bytes``: memory offered to the mesh for model copies (0: all of the
        machine's, as /proc/meminfo reports it)."""
        self.node_id = node_id
        self.labels = labels
        self.direct_address = direct_address
        self._seeds = list(dict.fromkeys(seeds))
        self.copies = copies
        self.handler = handler
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max_in_flight
        self.backoff = (backoff_base_s, backoff_cap_s)
        self._links: dict[str, _Link] = {}
        self._closing = False
        self.hardware = mesh_pb2.Hardware(
            cpu_cores=os.cpu_count() or 1,
            memory_bytes=memory_bytes or _memory_bytes(),
            execution_providers=available_providers(),
        )

    def start(self) -> None:
        for address in self._seeds:
            self._spawn(address)

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

    def learn(self, replicas: Sequence[mesh_pb2.ReplicaInfo]) -> None:
        held = self.connected_replicas()
        for info in replicas:
            if info.replica_id not in held and info.address:
                self._spawn(info.address)

    @property
    def links(self) -> dict[str, _Link]:
        return dict(self._links)

    async def close(self) -> None:
        self._closing = True
        links = list(self._links.values())
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)


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
            await asyncio.sleep(delay)

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
        options = channel_options(agent.max_message_bytes)
        async with aio.insecure_channel(self.address, options=options) as channel:
            stub = mesh_pb2_grpc.NodeLinkStub(channel)
            call = stub.Connect()
            self._call = call
            self._outbox = asyncio.Queue(maxsize=4096)
            tasks: list[asyncio.Task[None]] = []
            unsubscribe = None
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
                tasks.append(asyncio.create_task(self._write_loop(call)))
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
        self._offer(mesh_pb2.NodeMessage(infer_response=out))

    async def _write_loop(self, call: aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        while True:
            message = await self._outbox.get()
            await call.write(message)

    async def _telemetry_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            telemetry = mesh_pb2.Telemetry(
                unix_ms=int(time.time() * 1000), rss_bytes=resident_bytes()
            )
            cache = self._agent.copies.cache.stats()
            for e in self._agent.copies.entries():
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
            self._offer(mesh_pb2.NodeMessage(telemetry=telemetry))
