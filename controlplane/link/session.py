"""One node's live NodeLink stream, as the control plane holds it.

Contract:
- :class:`NodeSession` keeps what the node reported (its Hello, its copies, its latest telemetry
  indexed by copy), what was said to it (``sent``: the mark of the last command per variant, see
  :mod:`meshserve.controlplane.link.reconcile`) and whether its link record must be rewritten.
- :meth:`NodeSession.send` queues a message for the stream; the queue is bounded and a full one
  raises RESOURCE_EXHAUSTED rather than waiting.
- :meth:`NodeSession.tunnel` multiplexes queries down the stream with correlation ids; each waits
  for its answer at most until its deadline, and every pending query fails with UNAVAILABLE the
  moment the stream ends (:meth:`NodeSession.fail_pending`). A query too big for the stream's
  message limit once framed is refused (RESOURCE_EXHAUSTED) rather than sent, which would end the
  stream.
- ``replicas_said``: the replica set the node was last told of (its Welcome, then every pushed
  :class:`~meshserve.protos.mesh_pb2.ReplicaSet`), so a change is pushed once per node.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from meshserve.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable, from_code
from meshserve.controlplane.snapshot import VariantKey
from meshserve.protos import inference_pb2, mesh_pb2

__all__ = ["NodeSession", "ReplicaSet"]

#: A replica set as told to a node: (replica id, address) pairs, sorted (compared for changes).
ReplicaSet = tuple[tuple[str, str], ...]

_FRAME_SLACK = 4096  # framing a query for the tunnel adds less than this (ids, trace context)


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
        self.sent: dict[VariantKey, str] = {}  # last command per variant (reconcile's marks)
        self.replicas_said: ReplicaSet = ()  # the replica set the node was last told of
        self.record_dirty = asyncio.Event()
        self.record_dirty.set()
        self.started = time.monotonic()
        self._ids = itertools.count(1)
        self.closed = False
        self.draining = False  # the node said it is shutting down

    def linked_s(self) -> float:
        """Seconds since the stream was linked."""
        return time.monotonic() - self.started

    def observe(self, telemetry: mesh_pb2.Telemetry) -> None:
        """The node's latest telemetry, indexed by copy for the query path."""
        self.telemetry = telemetry
        self._by_copy = {(m.model, m.variant): m for m in telemetry.models}

    def copy_telemetry(self, key: VariantKey) -> mesh_pb2.ModelTelemetry | None:
        """The latest telemetry entry of one copy (None: none reported)."""
        return self._by_copy.get(key)

    def report(self, status: mesh_pb2.CopyStatus) -> None:
        """The node reported on one copy: held (or gone when UNLOADED); what was said about that
        variant is forgotten (the node acted or refused: decide afresh); the record is dirty."""
        key = (status.model, status.variant)
        if status.state == mesh_pb2.UNLOADED:
            self.copies.pop(key, None)
        else:
            self.copies[key] = status
        self.sent.pop(key, None)
        self.record_dirty.set()

    def record(self) -> mesh_pb2.NodeInfo:
        """The node's link record as this replica writes it."""
        return mesh_pb2.NodeInfo(
            node_id=self.node_id,
            labels=self.hello.labels,
            hardware=self.hello.hardware,
            direct_address=self.hello.direct_address,
            replicas=[self.replica_id],
            copies=list(self.copies.values()),
        )

    def send(self, message: mesh_pb2.ControlMessage) -> None:
        """Queue ``message`` for the stream; RESOURCE_EXHAUSTED when the queue is full."""
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
        """Send one query down the stream and await its answer (see the module contract)."""
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
        """Hand a tunneled answer to the query waiting for it (a late answer is dropped)."""
        future = self.pending.get(answer.correlation_id)
        if future is not None and not future.done():
            future.set_result(answer)

    def fail_pending(self) -> None:
        """The stream ended: every pending query fails with UNAVAILABLE, later ones too."""
        self.closed = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(Unavailable(f"node {self.node_id} disconnected"))
        self.pending.clear()
