"""Bandwidth-bounded telemetry: a per-link byte budget and a bounded buffer for offline periods.

Contract:

* A Telemetry message is an aggregate: one ``ModelTelemetry`` of counters per copy the node holds,
  never one record per query, so its size depends on the number of copies, not on the query rate
  (counters are varints: a tenfold rate costs at most a byte or so per counter).
* :class:`TelemetryBudget` bounds what one link sends to ``max_bytes_per_s``. Sizes are wire sizes
  (:func:`wire_size`: the serialized ``NodeMessage`` plus gRPC and HTTP/2 framing). A tick's
  allowance is ``max_bytes_per_s * interval``. When the header alone (the message without its
  model entries) exceeds it, the effective interval is lengthened: only every k-th tick is sent,
  with k the smallest whole number whose allowance holds the header, and the allowance of a sent
  tick is k ticks' worth. When the entries do not all fit, the entries with the most queries in
  flight (then the most requests) are kept, in that order, and the rest are dropped and counted.
  An entry that does not fit with its drift sketch window is kept without it (the window is not
  marked sent; a later one replaces it).
* :class:`OfflineBuffer` holds the summaries made while no control plane is connected, bounded in
  bytes: the oldest go first when a new one does not fit. :meth:`OfflineBuffer.drain` hands them
  back oldest first, to be sent before live telemetry resumes.

Pure: no I/O, no clock, no event loop; safe to unit-test directly.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from meshserve.protos import mesh_pb2

__all__ = ["FRAME_OVERHEAD_BYTES", "OfflineBuffer", "TelemetryBudget", "wire_size"]

# Per message on the stream: the gRPC length prefix (5 B) and an HTTP/2 DATA frame header (9 B).
FRAME_OVERHEAD_BYTES = 14


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def wire_size(telemetry: mesh_pb2.Telemetry) -> int:
    """Bytes ``telemetry`` costs on the stream: NodeMessage(telemetry=...) plus framing."""
    inner = telemetry.ByteSize()
    return 1 + _varint_len(inner) + inner + FRAME_OVERHEAD_BYTES


def _entry_size(entry: mesh_pb2.ModelTelemetry) -> int:
    """What one entry adds to its Telemetry: field tag, length and body."""
    body = entry.ByteSize()
    return 1 + _varint_len(body) + body


class TelemetryBudget:
    """Trim telemetry to ``max_bytes_per_s`` (0: unbounded). One instance per link: it keeps the
    tick count that interval stretching needs, and counters of what it did."""

    def __init__(self, max_bytes_per_s: int) -> None:
        if max_bytes_per_s < 0:
            raise ValueError("max_bytes_per_s must be >= 0 (0: unbounded)")
        self.max_bytes_per_s = max_bytes_per_s
        self.ticks = 0  # messages offered to apply()
        self.sent = 0  # messages returned
        self.skipped = 0  # ticks skipped to lengthen the interval
        self.dropped_entries = 0  # model entries dropped, over all messages
        self.last_dropped = 0  # model entries dropped from the last message returned
        self.stride = 1  # the last k: one tick in k is sent
        self.dropped_windows = 0  # drift sketch windows left out to fit (the counters stay)

    def apply(self, telemetry: mesh_pb2.Telemetry, interval_s: float) -> mesh_pb2.Telemetry | None:
        """The message to send this tick (``telemetry`` itself when it fits, else a trimmed copy),
        or None when this tick is skipped. ``interval_s``: the time between ticks."""
        self.ticks += 1
        if self.max_bytes_per_s <= 0:
            self.sent += 1
            self.last_dropped = 0
            return telemetry
        per_tick = self.max_bytes_per_s * max(interval_s, 1e-3)
        header = mesh_pb2.Telemetry()
        header.CopyFrom(telemetry)
        del header.models[:]
        header_size = wire_size(header)
        self.stride = max(1, math.ceil(header_size / per_tick))
        if self.ticks % self.stride != 0:
            self.skipped += 1
            return None
        allowance = int(per_tick * self.stride)
        self.sent += 1
        if wire_size(telemetry) <= allowance:
            self.last_dropped = 0
            return telemetry
        ranked = sorted(telemetry.models, key=lambda m: (m.in_flight, m.requests), reverse=True)
        inner = header.ByteSize()
        kept: list[mesh_pb2.ModelTelemetry] = []
        for entry in ranked:
            grown = inner + _entry_size(entry)
            if 1 + _varint_len(grown) + grown + FRAME_OVERHEAD_BYTES > allowance and (
                entry.HasField("drift")
            ):
                lean = mesh_pb2.ModelTelemetry()
                lean.CopyFrom(entry)
                lean.ClearField("drift")  # the counters matter more than one sketch window
                entry = lean
                self.dropped_windows += 1
                grown = inner + _entry_size(entry)
            if 1 + _varint_len(grown) + grown + FRAME_OVERHEAD_BYTES > allowance:
                break
            inner = grown
            kept.append(entry)
        header.models.extend(kept)
        kept_count = len(kept)
        self.last_dropped = len(ranked) - kept_count
        self.dropped_entries += self.last_dropped
        return header


class OfflineBuffer:
    """Summaries made while no control plane is connected, at most ``max_bytes`` of them (by
    :func:`wire_size`); the oldest are dropped first. A summary larger than the bound alone is
    dropped (counted) rather than emptying the buffer for it."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._items: deque[tuple[mesh_pb2.Telemetry, int]] = deque()
        self._bytes = 0
        self.dropped = 0  # summaries dropped to stay within the bound

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def append(self, telemetry: mesh_pb2.Telemetry) -> None:
        size = wire_size(telemetry)
        if size > self.max_bytes:
            self.dropped += 1
            return
        self._items.append((telemetry, size))
        self._bytes += size
        self._trim()

    def requeue(self, summaries: Iterable[mesh_pb2.Telemetry]) -> None:
        """Put summaries that were drained but not sent back in front (they are older than
        anything appended since), then drop the oldest as usual if over the bound."""
        for telemetry in reversed(list(summaries)):
            size = wire_size(telemetry)
            if size > self.max_bytes:
                self.dropped += 1
                continue
            self._items.appendleft((telemetry, size))
            self._bytes += size
        self._trim()

    def drain(self) -> list[mesh_pb2.Telemetry]:
        """Every buffered summary, oldest first; the buffer is empty afterwards."""
        out = [t for t, _ in self._items]
        self._items.clear()
        self._bytes = 0
        return out

    def _trim(self) -> None:
        while self._bytes > self.max_bytes and self._items:
            _, size = self._items.popleft()
            self._bytes -= size
            self.dropped += 1
