"""Bandwidth-bounded telemetry, sent on change: what each link sends (:class:`ChangeFilter`), a
per-link byte budget and a bounded buffer for offline periods.

Contract:

* :class:`ChangeFilter` (one per link, reset at each (re)connect) turns the node's full summary of
  a tick into what that link sends: a **full** message (``delta`` false: the header and every
  copy's entry) right after a (re)connect and then at least every ``heartbeat_s``
  (:data:`HEARTBEAT_S`); in between a **delta** (``delta`` true: the header and only the entries
  that changed since the last entry this link sent of that copy), or nothing at all. An entry
  changed when it is new, when a counter or gauge moved (in_flight, requests, errors,
  queue_depth, batches, batched_rows, max_batch_size, feedback and prediction counters), when
  p50 or p99 latency moved by more than :data:`LATENCY_CHANGE` of the last value sent, or when it
  carries a drift window (a summary carries only windows the link has not sent). An entry sent
  because its requests or errors moved is sent once more at the next tick even if quiet (a
  *settle* report), so a reader that diffs counters between reports (the live map's rates) sees
  a copy go idle within one interval. The
  node-wide cache counters ride along in whatever entry is sent; they trigger nothing. The
  header alone triggers a delta (with no entries) only when cpu_percent moved by
  :data:`CPU_CHANGE_POINTS` or rss_bytes by :data:`RSS_CHANGE`. So an idle node sends nothing
  between heartbeats, and a busy copy's entry goes out every tick. Only what was actually sent
  counts as sent (:meth:`ChangeFilter.sent`): an entry the budget trimmed away stays due, a tick
  the budget skipped leaves everything due, and a full message the budget had to trim goes out
  as a delta (the control plane keeps the figures of the copies left out).

* A Telemetry message is an aggregate: one ``ModelTelemetry`` of counters per copy the node holds,
  never one record per query, so its size depends on the number of copies, not on the query rate
  (counters are varints: a tenfold rate costs at most a byte or so per counter).
* :class:`TelemetryBudget` bounds what one link sends to ``max_bytes_per_s``. Sizes are wire sizes
  (:func:`wire_size`: the serialized ``NodeMessage`` plus gRPC and HTTP/2 framing). A tick's
  allowance is ``max_bytes_per_s * interval`` (a tick: a message offered to it; ticks with
  nothing to send are not offered, which only leaves more room). When the header alone (the
  message without its model entries) exceeds it, the effective interval is lengthened: only
  every k-th tick is sent, with k the smallest whole number whose allowance holds the header,
  and the allowance of a sent tick is k ticks' worth. When the entries do not all fit, the
  entries with the most queries in flight (then the most requests) are kept, in that order, and
  the rest are dropped and counted.
  An entry that does not fit with its drift sketch window is kept without it (the window is not
  marked sent; a later one replaces it).
* :class:`OfflineBuffer` holds the summaries made while no control plane is connected, bounded in
  bytes: the oldest go first when a new one does not fit. :meth:`OfflineBuffer.drain` hands them
  back oldest first, to be sent before live telemetry resumes.

Pure: no I/O, no clock (the caller passes the time), no event loop; safe to unit-test directly.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Final

from meshserve.protos import mesh_pb2

__all__ = [
    "CPU_CHANGE_POINTS",
    "FRAME_OVERHEAD_BYTES",
    "HEARTBEAT_S",
    "LATENCY_CHANGE",
    "RSS_CHANGE",
    "ChangeFilter",
    "OfflineBuffer",
    "TelemetryBudget",
    "wire_size",
]

#: A full telemetry message goes out on each link at least this often (seconds), changed or not.
HEARTBEAT_S: Final = 30.0
#: p50 / p99 latency is resent when it moved by more than this share of the value last sent.
LATENCY_CHANGE: Final = 0.10
#: The header alone is resent when cpu_percent moved by this many points (of one core) ...
CPU_CHANGE_POINTS: Final = 25.0
#: ... or rss_bytes by more than this share.
RSS_CHANGE: Final = 0.10

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


_Key = tuple[str, str]
_Figures = tuple[int, int, int, int, int, int, int, int, int, float, int]


def _figures(entry: mesh_pb2.ModelTelemetry) -> _Figures:
    """The figures of an entry that trigger a resend when they move at all."""
    return (
        entry.in_flight,
        entry.requests,
        entry.errors,
        entry.queue_depth,
        entry.batches,
        entry.batched_rows,
        entry.max_batch_size,
        entry.feedback_joined,
        entry.feedback_correct,
        entry.feedback_abs_error,
        entry.predictions_logged,
    )


def _moved(last: float, now: float, share: float) -> bool:
    return abs(now - last) > share * abs(last)


class ChangeFilter:
    """What one link sends of each tick's summary (see the module contract). Pure: the caller
    passes the time (any monotonic clock, in seconds)."""

    def __init__(self, heartbeat_s: float = HEARTBEAT_S) -> None:
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be > 0")
        self.heartbeat_s = heartbeat_s
        self.full_sent = 0  # full messages sent (counted by sent())
        self.deltas_sent = 0  # delta messages sent
        self.quiet = 0  # ticks with nothing to send
        self._last: dict[_Key, tuple[_Figures, float, float]] = {}  # per copy: figures, p50, p99
        self._header: tuple[float, int] | None = None  # cpu_percent, rss_bytes last sent
        self._settling: set[_Key] = set()  # requests/errors moved when last sent: resend once
        self._moving: set[_Key] = set()  # the entries whose requests/errors moved, last select()
        self._full_at: float | None = None  # when the last full message went (None: one is due)

    def reset(self) -> None:
        """A new stream: the next message is full, and nothing counts as sent."""
        self._last.clear()
        self._header = None
        self._settling.clear()
        self._moving.clear()
        self._full_at = None

    def select(self, summary: mesh_pb2.Telemetry, now: float) -> mesh_pb2.Telemetry | None:
        """The message to offer this tick: ``summary`` itself when a full message is due, a
        delta, or None (nothing to send). Call :meth:`sent` with what actually went out."""
        held = {(m.model, m.variant) for m in summary.models}
        for key in self._last.keys() - held:  # copies gone: forget them
            del self._last[key]
        self._settling &= held
        self._moving = set()
        entries = []
        for entry in summary.models:
            key = (entry.model, entry.variant)
            changed, moving = self._change(key, entry)
            if moving:
                self._moving.add(key)
            if changed or key in self._settling:
                entries.append(entry)
        if self._full_at is None or now - self._full_at >= self.heartbeat_s:
            summary.delta = False
            return summary
        if not entries and not self._header_moved(summary):
            self.quiet += 1
            return None
        out = mesh_pb2.Telemetry(
            unix_ms=summary.unix_ms,
            cpu_percent=summary.cpu_percent,
            rss_bytes=summary.rss_bytes,
            memory_available_bytes=summary.memory_available_bytes,
            delta=True,
        )
        out.models.extend(entries)
        return out

    def sent(self, telemetry: mesh_pb2.Telemetry, now: float, trimmed: bool) -> mesh_pb2.Telemetry:
        """``telemetry`` (what :meth:`select` returned, as the budget let it through; ``trimmed``:
        the budget left entries out) goes out now; returns it, as a delta when it was a full
        message the budget trimmed (the caller's copy: the budget made a new message then)."""
        if not telemetry.delta:
            if trimmed:
                telemetry.delta = True
            self._full_at = now  # the heartbeat is done either way: a trimmed one must not loop
        if telemetry.delta:
            self.deltas_sent += 1
        else:
            self.full_sent += 1
        self._header = (telemetry.cpu_percent, telemetry.rss_bytes)
        for entry in telemetry.models:
            key = (entry.model, entry.variant)
            self._last[key] = (_figures(entry), entry.latency_p50_ms, entry.latency_p99_ms)
            if key in self._moving:
                self._settling.add(key)
            else:
                self._settling.discard(key)  # a quiet report of it went
        return telemetry

    def _change(self, key: _Key, entry: mesh_pb2.ModelTelemetry) -> tuple[bool, bool]:
        """(whether ``entry`` changed since the last one sent, whether its requests or errors
        moved: then a settle report follows)."""
        last = self._last.get(key)
        if last is None:
            return True, False
        figures, p50, p99 = last
        now = _figures(entry)
        moving = now[1:3] != figures[1:3]  # requests, errors
        changed = (
            moving
            or now != figures
            or entry.HasField("drift")
            or _moved(p50, entry.latency_p50_ms, LATENCY_CHANGE)
            or _moved(p99, entry.latency_p99_ms, LATENCY_CHANGE)
        )
        return changed, moving

    def _header_moved(self, summary: mesh_pb2.Telemetry) -> bool:
        if self._header is None:
            return True
        cpu, rss = self._header
        return abs(summary.cpu_percent - cpu) >= CPU_CHANGE_POINTS or _moved(
            rss, summary.rss_bytes, RSS_CHANGE
        )
