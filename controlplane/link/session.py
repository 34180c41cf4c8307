"""One node's live NodeLink stream, as the control plane holds it.

Contract:
- :class:`NodeSession` keeps what the node reported (its Hello, its copies, its latest telemetry
  indexed by copy), what was said to it (``sent``: the mark of the last command per variant, see
  :mod:`meshserve.controlplane.link.reconcile`) and whether its link record must be rewritten.
- :meth:`NodeSession.send` queues a message for the stream; the queue is bounded and a full one
  raises RESOURCE_EXHAUSTED rather than waiting (:mod:`~meshserve.controlplane.link.outbox`: a
  writer task runs only while messages wait).
- :meth:`NodeSession.tunnel` multiplexes queries down the stream with correlation ids; each waits
  for its answer at most until its deadline, and every pending query fails with UNAVAILABLE the
  moment the stream ends (:meth:`NodeSession.fail_pending`). A query too big for the stream's
  message limit once framed is refused (RESOURCE_EXHAUSTED) rather than sent, which would end the
  stream.
- What a node says of its copies is believed only as :mod:`~meshserve.controlplane.link.trust`
  decides: ``copies`` holds the believed ones (they go to the link record, hence the view and
  routing), ``ordered`` the sha256s ordered per variant on this stream, ``claims`` the refused
  reports (bounded, counted); :meth:`NodeSession.observe` keeps only telemetry about believed
  copies.
- Telemetry arrives on change (``node/telemetry.py``): a full message (``delta`` false) replaces
  what the session holds; a delta updates the header and the entries it carries, and every other
  copy keeps the entry last received, so ``telemetry`` always reads as the node's full latest
  report (``delta`` false, one entry per believed copy that reported, the header of the latest
  message). A drift window is seen only in the report of the message that carried it (a kept
  entry loses its window), as when every message was full. A copy reported UNLOADED loses its
  entry at once. ``telemetry`` is replaced, never changed in place (readers may hold it).
- ``replicas_said``: the replica set the node was last told of (its Welcome, then every pushed
  :class:`~meshserve.protos.mesh_pb2.ReplicaSet`), so a change is pushed once per node.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable

from meshserve.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable, from_code
from meshserve.controlplane.link.outbox import Outbox
from meshserve.controlplane.link.trust import (
    DEFAULT_TELEMETRY_BYTES_PER_S,
    ByteBudget,
    Claims,
    adopted,
    held_telemetry,
    judge,
)
from meshserve.controlplane.observe.telemetry import flights_of
from meshserve.controlplane.snapshot import EMBEDDED, Snapshot, VariantKey
from meshserve.protos import inference_pb2, mesh_pb2

__all__ = ["NodeSession", "ReplicaSet"]

#: A replica set as told to a node: (replica id, address) pairs, sorted (compared for changes).
ReplicaSet = tuple[tuple[str, str], ...]

_FRAME_SLACK = 4096  # framing a query for the tunnel adds less than this (ids, trace context)
_SHAS_KEPT = 4  # sha256s remembered as ordered per variant (the newest: a Load may overtake one)


class NodeSession:
    """One live stream from one node."""

    def __init__(
        self,
        hello: mesh_pb2.Hello,
        replica_id: str,
        outbox_size: int,
        max_message_bytes: int = 64 << 20,
        telemetry_bytes_per_s: int = DEFAULT_TELEMETRY_BYTES_PER_S,
    ) -> None:
        self.hello = hello
        self.max_message_bytes = max_message_bytes
        self.node_id = hello.node_id
        self.replica_id = replica_id
        self.copies: dict[VariantKey, mesh_pb2.CopyStatus] = {}  # believed (see trust.py)
        self.ordered: dict[VariantKey, list[str]] = {}  # sha256s ordered on this stream
        self.claims = Claims()  # reports not believed (bounded), counted by reason
        self.telemetry_dropped = 0  # telemetry entries about copies not held, dropped
        # the node's telemetry budget here (trust.ByteBudget: excess messages dropped, counted)
        self.telemetry_budget = ByteBudget(telemetry_bytes_per_s, 16 * telemetry_bytes_per_s)
        self.reconcile_due = False  # a reconcile of this node is scheduled (coalesced)
        self.telemetry = mesh_pb2.Telemetry()
        self.flights: dict[VariantKey, float] = {}  # in flight per copy, as last reported
        self._by_copy: dict[VariantKey, mesh_pb2.ModelTelemetry] = {}
        self.outbox: Outbox[mesh_pb2.ControlMessage] = Outbox(outbox_size)  # (outbox.py)
        self.pending: dict[int, asyncio.Future[mesh_pb2.TunnelResponse]] = {}
        self.sent: dict[VariantKey, str] = {}  # last command per variant (reconcile's marks)
        self.replicas_said: ReplicaSet = ()  # the replica set the node was last told of
        self.started = time.monotonic()
        self._ids = itertools.count(1)
        self.closed = False
        self.draining = False  # the node said it is shutting down
        self.embedded = hello.kind == EMBEDDED  # an application member: never placed onto

    def linked_s(self) -> float:
        """Seconds since the stream was linked."""
        return time.monotonic() - self.started

    def adopt(self, snapshot: Snapshot) -> None:
        """Take the copies the Hello names (a node back from a cut): believed (and counted as
        ordered) when ``snapshot`` registers the variant with that sha256; the others are
        claims, which reconcile tells the node to unload or load afresh."""
        believed, refused = adopted(snapshot, self.hello.copies)
        for copy in believed:
            key = (copy.model, copy.variant)
            self.copies[key] = copy
            self.ordered[key] = [copy.sha256]
        for copy in refused:
            self.claims.refuse(copy, "a Hello copy of no registered variant with its sha256")

    def ordered_load(self, key: VariantKey, sha256: str) -> None:
        """A Load of ``sha256`` was sent for ``key``: a report of it will be believed."""
        shas = self.ordered.setdefault(key, [])
        sha = sha256.lower()
        if sha in shas:
            shas.remove(sha)
        shas.append(sha)
        del shas[:-_SHAS_KEPT]

    def ordered_unload(self, key: VariantKey) -> None:
        """An Unload was sent for ``key``: a later report of it needs a new Load."""
        self.ordered.pop(key, None)

    def judge(self, status: mesh_pb2.CopyStatus) -> str | None:
        """None when ``status`` is believed, else why not (:func:`trust.judge`)."""
        return judge(status, self.ordered, self.copies)

    def reconcile_view(self) -> dict[VariantKey, mesh_pb2.CopyStatus]:
        """What reconcile is told the node holds (:meth:`trust.Claims.as_unheld`)."""
        if not self.claims.copies:
            return self.copies
        return self.claims.as_unheld(self.copies)

    def observe(self, telemetry: mesh_pb2.Telemetry) -> None:
        """Merge a Telemetry the node sent (only entries of copies it is believed to hold; a
        full one replaces, a delta updates: see the module contract), indexed by copy for the
        query path."""
        telemetry, dropped = held_telemetry(telemetry, self.copies)
        self.telemetry_dropped += dropped
        if not telemetry.delta:
            self._hold(telemetry)
            return
        entries: dict[VariantKey, mesh_pb2.ModelTelemetry] = {}
        for key, entry in self._by_copy.items():
            if key not in self.copies:
                continue
            if entry.HasField("drift"):  # seen with the message that carried it
                lean = mesh_pb2.ModelTelemetry()
                lean.CopyFrom(entry)
                lean.ClearField("drift")
                entry = lean
            entries[key] = entry
        for entry in telemetry.models:
            entries[(entry.model, entry.variant)] = entry
        self._hold(telemetry, entries.values())

    def _hold(
        self,
        telemetry: mesh_pb2.Telemetry,
        entries: Iterable[mesh_pb2.ModelTelemetry] | None = None,
    ) -> None:
        """Hold ``telemetry`` as the latest (with ``entries`` instead of its own when given:
        a new message, as a full one)."""
        if entries is not None:
            merged = mesh_pb2.Telemetry()
            merged.CopyFrom(telemetry)
            merged.delta = False
            del merged.models[:]
            merged.models.extend(entries)
            telemetry = merged
        self.telemetry = telemetry
        self._by_copy = {(m.model, m.variant): m for m in telemetry.models}
        # an embedded member's queries are its own, not demand on the mesh's copies
        self.flights = {} if self.embedded else flights_of(telemetry)

    def copy_telemetry(self, key: VariantKey) -> mesh_pb2.ModelTelemetry | None:
        """The latest telemetry entry of one copy (None: none reported)."""
        return self._by_copy.get(key)

    def report(self, status: mesh_pb2.CopyStatus) -> None:
        """The node reported on one copy, a report :meth:`judge` believed: held (or gone when
        UNLOADED); what was said about that variant is forgotten (the node acted or refused:
        decide afresh). The caller has the record rewritten (``RecordWriter.mark``)."""
        key = (status.model, status.variant)
        self.claims.forget(key)
        if status.state == mesh_pb2.UNLOADED:
            self.copies.pop(key, None)
            if key in self._by_copy:  # its last figures are no longer anyone's load
                self._hold(self.telemetry, (m for k, m in self._by_copy.items() if k != key))
        else:
            self.copies[key] = status
        self.sent.pop(key, None)

    def record(self) -> mesh_pb2.NodeInfo:
        """The node's link record as this replica writes it."""
        return mesh_pb2.NodeInfo(
            node_id=self.node_id,
            labels=self.hello.labels,
            hardware=self.hello.hardware,
            direct_address=self.hello.direct_address,
            replicas=[self.replica_id],
            copies=list(self.copies.values()),
            kind=self.hello.kind,
            embedded=self.hello.embedded,
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
        message = mesh_pb2.ControlMessage()  # the frame built in place: the query copied once
        frame = message.infer_request
        frame.correlation_id = correlation_id
        frame.request.CopyFrom(request)
        frame.trace_context.update(trace_context)
        frame.timeout_ms = int(timeout * 1000) if timeout is not None else 0
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
