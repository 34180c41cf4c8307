"""The telemetry budget (trimming order, counts, interval stretching) and the offline buffer."""

from __future__ import annotations

import pytest

from meshserve.node.telemetry import OfflineBuffer, TelemetryBudget, wire_size
from meshserve.protos import mesh_pb2


def _telemetry(
    entries: list[tuple[str, int, int]], unix_ms: int = 1_700_000_000_000
) -> mesh_pb2.Telemetry:
    t = mesh_pb2.Telemetry(unix_ms=unix_ms, rss_bytes=123_456_789)
    for name, in_flight, requests in entries:
        t.models.add(model=name, variant="v1", in_flight=in_flight, requests=requests, errors=1)
    return t


def _header_size(t: mesh_pb2.Telemetry) -> int:
    header = mesh_pb2.Telemetry()
    header.CopyFrom(t)
    del header.models[:]
    return wire_size(header)


def test_wire_size_is_the_node_message_plus_framing() -> None:
    t = _telemetry([("a", 1, 2)])
    assert wire_size(t) == mesh_pb2.NodeMessage(telemetry=t).ByteSize() + 14


def test_a_message_within_budget_is_sent_unchanged() -> None:
    t = _telemetry([("a", 1, 10), ("b", 0, 5)])
    budget = TelemetryBudget(10_000)
    assert budget.apply(t, 1.0) is t
    assert (budget.sent, budget.skipped, budget.dropped_entries, budget.last_dropped) == (
        1,
        0,
        0,
        0,
    )


def test_unbounded_budget_sends_everything() -> None:
    t = _telemetry([(f"m{i}", 0, i) for i in range(100)])
    assert TelemetryBudget(0).apply(t, 0.1) is t


def test_trimming_keeps_busiest_entries_first_and_counts_the_rest() -> None:
    entries = [("idle", 0, 1), ("busy", 9, 5), ("popular", 0, 900), ("warm", 2, 3), ("x", 0, 0)]
    t = _telemetry(entries)
    one = wire_size(_telemetry([("busy", 9, 5)])) - _header_size(t)  # one entry's cost
    allowance = _header_size(t) + 3 * one + 2  # room for three entries, not four
    budget = TelemetryBudget(allowance)
    out = budget.apply(t, 1.0)
    assert out is not None and out is not t
    assert [m.model for m in out.models] == ["busy", "warm", "popular"]  # in_flight, then requests
    assert wire_size(out) <= allowance
    assert (out.unix_ms, out.rss_bytes) == (t.unix_ms, t.rss_bytes)  # the header is kept whole
    assert budget.last_dropped == 2 and budget.dropped_entries == 2
    assert len(t.models) == 5  # the input is not modified
    budget.apply(t, 1.0)
    assert budget.dropped_entries == 4  # counted over messages


def test_the_budget_is_per_second_times_the_interval() -> None:
    t = _telemetry([(f"m{i}", i, i) for i in range(20)])
    budget = TelemetryBudget(1000)
    for interval in (0.1, 0.2, 0.5):
        out = budget.apply(t, interval)
        assert out is not None
        assert _header_size(t) < wire_size(out) <= 1000 * interval
    assert len(budget.apply(t, 0.5).models) > len(budget.apply(t, 0.1).models)  # type: ignore[union-attr]


def test_a_header_over_budget_lengthens_the_interval() -> None:
    t = _telemetry([("a", 1, 1)])
    header = _header_size(t)
    budget = TelemetryBudget(header * 3)  # a 0.1 s tick allows 0.3 headers: every 4th tick
    outs = [budget.apply(t, 0.1) for _ in range(12)]
    assert budget.stride == 4
    assert [o is not None for o in outs] == [False, False, False, True] * 3
    assert (budget.sent, budget.skipped) == (3, 9)
    # a sent tick carries k ticks' allowance: the header fits, entries only as room allows
    sent = [o for o in outs if o is not None]
    assert all(wire_size(o) <= header * 3 * 0.4 for o in sent)
    # over any whole number of strides the rate stays under the bound
    assert sum(wire_size(o) for o in sent) / (12 * 0.1) <= header * 3


def test_stretching_undoes_itself_when_the_budget_allows() -> None:
    t = _telemetry([("a", 1, 1)])
    budget = TelemetryBudget(wire_size(t) * 10)
    assert budget.apply(t, 0.01) is None  # a tick allows a tenth of the message: stretched
    assert budget.stride > 1
    assert budget.apply(t, 1.0) is t
    assert budget.stride == 1


def test_size_does_not_grow_with_the_query_rate() -> None:
    low = _telemetry([("mlp", 1, 80)])
    high = _telemetry([("mlp", 20, 800_000)])  # 10_000x the requests
    assert wire_size(high) - wire_size(low) <= 3


def test_negative_bounds_are_rejected() -> None:
    with pytest.raises(ValueError):
        TelemetryBudget(-1)
    with pytest.raises(ValueError):
        OfflineBuffer(-1)


def test_offline_buffer_keeps_order_and_drains_empty() -> None:
    buf = OfflineBuffer(64 << 10)
    sent = [_telemetry([("a", 0, i)], unix_ms=1000 + i) for i in range(10)]
    for t in sent:
        buf.append(t)
    assert len(buf) == 10 and buf.bytes == sum(wire_size(t) for t in sent)
    assert [t.unix_ms for t in buf.drain()] == [t.unix_ms for t in sent]
    assert len(buf) == 0 and buf.bytes == 0 and buf.drain() == []


def test_offline_buffer_drops_oldest_over_the_byte_bound() -> None:
    size = wire_size(_telemetry([("a", 0, 0)], unix_ms=1000))
    buf = OfflineBuffer(size * 5)
    for i in range(12):
        buf.append(_telemetry([("a", 0, 0)], unix_ms=1000 + i))  # all the same size
        assert buf.bytes <= size * 5
    assert buf.dropped == 7
    assert [t.unix_ms for t in buf.drain()] == [1007, 1008, 1009, 1010, 1011]


def test_offline_buffer_drops_a_summary_larger_than_the_bound() -> None:
    small = _telemetry([("a", 0, 0)])
    buf = OfflineBuffer(wire_size(small) * 2)
    buf.append(small)
    buf.append(_telemetry([(f"m{i}", 0, 0) for i in range(50)]))
    assert buf.dropped == 1
    assert buf.drain() == [small]


def test_requeue_puts_unsent_summaries_back_in_front() -> None:
    buf = OfflineBuffer(64 << 10)
    for i in range(3):
        buf.append(_telemetry([], unix_ms=i))
    drained = buf.drain()
    buf.append(_telemetry([], unix_ms=10))  # made after the link dropped
    buf.requeue(drained[1:])  # the first was written before the link dropped
    assert [t.unix_ms for t in buf.drain()] == [1, 2, 10]
