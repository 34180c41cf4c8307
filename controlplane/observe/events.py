"""Decision-event ring: what the control plane decided and why, kept in etcd for ``ListEvents``.

Contract:
- :meth:`EventLog.record` is synchronous, never blocks and never raises because of etcd (only an
  empty ``kind`` is a :class:`ValueError`). It stamps the event (``unix_ms``, ``replica_id``), logs
  it at INFO on ``meshserve.events``, counts it on the OpenTelemetry counter ``meshserve.events``
  (attribute ``kind``), adds it as an event to the current span when that span is recording,
  passes it to every subscriber (:meth:`EventLog.subscribe`) and queues it. The queue holds at
  most ``max_pending`` events: when full, the oldest queued event is dropped and counted
  (``stats["dropped"]``); the batch being written is kept until it lands.
- Quotas (:class:`~meshserve.controlplane.observe.quota.EventQuota`): each kind may fill a
  quarter of the ring per minute, each (kind, model) 30 events per minute; an event over its
  quota is dropped before anything else happens (no log line, no subscriber, no webhook) and
  counted (:attr:`EventLog.throttled`, one warning per kind), so one kind of event about many
  models cannot erase the history of the others.
- A background writer (:meth:`EventLog.start`) drains the queue in batches. Each batch is one
  transaction of the registry (:meth:`~meshserve.controlplane.registry.Registry.append_events`)
  that compare-and-swaps the sequence counter ``/meshserve/events-seq`` (decimal text, the last
  sequence number handed out; compared on its mod revision), puts the batch's events at
  ``events/<seq, 20 digits>`` and deletes every event older than the newest ``capacity`` ones. So
  sequence numbers are unique and increasing across every replica, keys appear in sequence order,
  and the ring never holds more than ``capacity`` events (as long as all replicas agree on it).
  A lost race re-reads the counter (from the same transaction's failure branch) and retries.
- On store errors the batch stays pending and the writer retries with backoff (0.2 s doubling to
  5 s). A transaction whose outcome is unknown (timeout, broken connection) is checked before it is
  retried: if its first event is stored byte for byte, the batch committed and is not rewritten.
- :meth:`EventLog.close` gives the writer up to 2 s to flush what is pending, then cancels it;
  events still pending are lost (``stats["pending"]`` says how many).
- :meth:`EventLog.list` reads the ring from the store (all replicas' events, never this replica's
  unwritten ones) and returns the newest ``limit`` events matching the filters, oldest first.

Call :meth:`EventLog.record` from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from opentelemetry import metrics, trace

from meshserve.controlplane import keys
from meshserve.controlplane.observe.quota import EventQuota
from meshserve.controlplane.registry import Registry, SeqCounter
from meshserve.protos import mesh_pb2

__all__ = ["EventLog", "EventSink"]

_log = logging.getLogger("meshserve.events")

_DEFAULT_LIMIT = 50
#: Events per transaction: etcd refuses more than 128 operations per txn by default
#: (``--max-txn-ops``); a batch also uses one put for the counter and one range delete.
_MAX_BATCH = 100
#: Rough bound on one transaction's payload (etcd's default request limit is 1.5 MiB).
_MAX_BATCH_BYTES = 512 * 1024
_MAX_MESSAGE_CHARS = 2048
_MAX_CAS_ATTEMPTS = 50
_BACKOFF_MIN = 0.2
_BACKOFF_MAX = 5.0
_CLOSE_TIMEOUT = 2.0
#: Bound on one etcd call made by the writer or :meth:`EventLog.list`.
_OP_TIMEOUT = 5.0

_Events = builtins.list[mesh_pb2.Event]


class EventSink(Protocol):
    """Where decisions are reported (an :class:`EventLog`; tests may pass a list-backed one)."""

    def record(
        self, kind: str, *, model: str = "", variant: str = "", node_id: str = "", message: str = ""
    ) -> None: ...


class EventLog:
    """This replica's writer into the shared event ring, and a reader of it."""

    def __init__(
        self,
        registry: Registry,
        replica_id: str,
        *,
        capacity: int = 1000,
        max_pending: int = 10_000,
        quota: EventQuota | None = None,
    ) -> None:
        """``quota``: the ring's per-kind and per-model quotas (default: for ``capacity``)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._registry = registry
        self._replica_id = replica_id
        self._capacity = capacity
        self._max_pending = max_pending
        self._quota = quota or EventQuota(capacity)
        self._batch_limit = min(_MAX_BATCH, capacity)
        self._pending: collections.deque[mesh_pb2.Event] = collections.deque()
        # The batch being written (or retried); still pending until a transaction lands it.
        self._inflight: _Events = []
        # The first event (numbered) of a transaction whose outcome is unknown.
        self._uncertain: mesh_pb2.Event | None = None
        # Cached counter state. A stale guess only costs one failed compare, whose failure
        # branch returns the real value.
        self._counter_seen = SeqCounter()
        self._written = 0
        self._dropped = 0
        self._wake = asyncio.Event()  # something was queued
        self._drained = asyncio.Event()  # the writer found nothing pending
        self._flush_now = asyncio.Event()  # close(): skip the remaining backoff
        self._task: asyncio.Task[None] | None = None
        self._listeners: builtins.list[Callable[[mesh_pb2.Event], None]] = []
        self._counter = metrics.get_meter("meshserve.controlplane").create_counter(
            "meshserve.events", unit="1", description="control-plane decision events recorded"
        )

    # -- recording --------------------------------------------------------------------------

    def record(
        self,
        kind: str,
        *,
        model: str = "",
        variant: str = "",
        node_id: str = "",
        message: str = "",
    ) -> None:
        """Queue one event for etcd (see the module contract). Never blocks.

        :raises ValueError: ``kind`` is empty.
        """
        if not kind:
            raise ValueError("event kind must not be empty")
        if not self._quota.admit(kind, model):
            if self._quota.refused[kind] == 1:
                _log.warning(
                    "%s events over their quota in the event ring: dropped and counted "
                    "(logged once per kind)",
                    kind,
                )
            return
        if len(message) > _MAX_MESSAGE_CHARS:
            message = message[: _MAX_MESSAGE_CHARS - 1] + "…"
        event = mesh_pb2.Event(
            unix_ms=time.time_ns() // 1_000_000,
            kind=kind,
            model=model,
            variant=variant,
            node_id=node_id,
            message=message,
            replica_id=self._replica_id,
        )
        _log.info(
            "%s%s%s%s: %s",
            kind,
            f" model={model}" if model else "",
            f" variant={variant}" if variant else "",
            f" node={node_id}" if node_id else "",
            message,
        )
        self._observe(kind, model, variant, node_id, message)
        for listener in self._listeners:
            listener(event)
        if len(self._pending) + len(self._inflight) >= self._max_pending:
            self._dropped += 1
            if not self._pending:  # all pending events are in the batch being written
                return  # (only when max_pending <= the batch size): drop the newcomer
            self._pending.popleft()
        self._pending.append(event)
        self._drained.clear()
        self._wake.set()

    def subscribe(self, listener: Callable[[mesh_pb2.Event], None]) -> None:
        """Call ``listener`` with every event this replica records (it must not block or
        raise: e.g. :meth:`meshserve.controlplane.observe.webhook.Webhook.offer`)."""
        self._listeners.append(listener)

    def _observe(self, kind: str, model: str, variant: str, node_id: str, message: str) -> None:
        """OpenTelemetry side of :meth:`record`; telemetry trouble never reaches the caller."""
        try:
            self._counter.add(1, {"kind": kind})
            span = trace.get_current_span()
            if span.is_recording():
                attributes = {
                    "meshserve.model": model,
                    "meshserve.variant": variant,
                    "meshserve.node": node_id,
                    "message": message,
                }
                span.add_event(kind, {k: v for k, v in attributes.items() if v})
        except Exception:  # pragma: no cover - the OTel API is documented not to raise
            _log.debug("could not export event %s to OpenTelemetry", kind, exc_info=True)

    @property
    def throttled(self) -> dict[str, int]:
        """Events dropped over their quota, per kind."""
        return dict(self._quota.refused)

    @property
    def stats(self) -> dict[str, int]:
        """``pending`` (queued or being written), ``written`` (landed in etcd), ``dropped``."""
        return {
            "pending": len(self._pending) + len(self._inflight),
            "written": self._written,
            "dropped": self._dropped,
        }

    # -- writer -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background writer (idempotent). Needs a running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"event-log-{self._replica_id}")

    async def close(self) -> None:
        """Flush pending events (at most 2 s), then stop the writer. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        self._flush_now.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                if self._pending or self._inflight:
                    await self._drained.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._flush_now.clear()
        if self._pending or self._inflight:
            _log.warning("event log closed with %d events not written", self.stats["pending"])

    async def _run(self) -> None:
        backoff = _BACKOFF_MIN
        failing = False
        while True:
            if not self._pending and not self._inflight:
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._write_batch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    _log.warning(
                        "cannot write events to etcd (%d pending): %r", self.stats["pending"], exc
                    )
                else:
                    _log.debug("event write retry failed: %r", exc)
                failing = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):
                        await self._flush_now.wait()
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            if failing:
                _log.info("event writes to etcd resumed")
            failing = False
            backoff = _BACKOFF_MIN

    def _take_batch(self) -> None:
        if self._inflight:
            return  # a failed batch is retried as it was
        size = 0
        while self._pending and len(self._inflight) < self._batch_limit:
            size += 2 * self._pending[0].ByteSize() + 64  # JSON is larger than the wire form
            if self._inflight and size > _MAX_BATCH_BYTES:
                break
            self._inflight.append(self._pending.popleft())

    async def _write_batch(self) -> None:
        """Write the in-flight batch (taking one first if needed); raises on store errors."""
        self._take_batch()
        batch = self._inflight
        if self._uncertain is not None:
            first = self._uncertain
            stored = await asyncio.wait_for(self._registry.has_event(first), _OP_TIMEOUT)
            self._uncertain = None
            if stored:
                self._done(batch)  # the transaction that timed out did commit
                return
        for _ in range(_MAX_CAS_ATTEMPTS):
            try:
                ok, self._counter_seen = await asyncio.wait_for(
                    self._registry.append_events(batch, self._counter_seen, self._capacity),
                    _OP_TIMEOUT,
                )
            except BaseException:
                self._uncertain = mesh_pb2.Event()  # numbered by append_events
                self._uncertain.CopyFrom(batch[0])
                raise
            if ok:
                self._done(batch)
                return
        raise RuntimeError(f"event sequence counter contended {_MAX_CAS_ATTEMPTS} times in a row")

    def _done(self, batch: _Events) -> None:
        self._written += len(batch)
        if batch is self._inflight:
            self._inflight = []

    # -- reading ----------------------------------------------------------------------------

    async def list(self, limit: int = _DEFAULT_LIMIT, kind: str = "", model: str = "") -> _Events:
        """The newest ``limit`` events in the ring matching ``kind`` and ``model`` (empty = any),
        oldest first. ``limit`` 0 means 50; it is clamped to ``1..capacity``.

        :raises aetcd.exceptions.ClientError: etcd unreachable.
        :raises TimeoutError: the store did not answer within 5 s.
        """
        if limit == 0:
            limit = _DEFAULT_LIMIT
        limit = max(1, min(limit, self._capacity))
        values = await asyncio.wait_for(self._registry.read_events(), _OP_TIMEOUT)
        found: _Events = []
        for value in values:  # newest first: decode only as far as needed
            try:
                event = keys.decode(value, mesh_pb2.Event())
            except Exception:
                _log.warning("undecodable event in the ring: %r", value[:80])
                continue
            if (kind and event.kind != kind) or (model and event.model != model):
                continue
            found.append(event)
            if len(found) >= limit:
                break
        found.reverse()
        return found
