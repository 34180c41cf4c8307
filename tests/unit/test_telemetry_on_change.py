"""Telemetry on change (issue 19 §1): what a link sends of each tick's summary
(node/telemetry.py ChangeFilter, pure) and how the control plane merges deltas into the node's
full latest telemetry (controlplane/link/session.py NodeSession.observe)."""

from __future__ import annotations

import pytest

from meshserve.controlplane.link.session import NodeSession
from meshserve.controlplane.observe.ui.view import Rates
from meshserve.node.telemetry import ChangeFilter, TelemetryBudget, wire_size
from meshserve.protos import mesh_pb2


def _summary(unix_ms: int = 1_000, cpu: float = 1.0, **copies: int) -> mesh_pb2.Telemetry:
    """A node summary: one entry per copy ``name=requests``."""
    t = mesh_pb2.Telemetry(unix_ms=unix_ms, cpu_percent=cpu, rss_bytes=100 << 20)
    for name, requests in copies.items():
        t.models.add(model=name, variant="v1", requests=requests, cache_hits=requests)
    return t


def _names(t: mesh_pb2.Telemetry | None) -> list[str] | None:
    return None if t is None else [m.model for m in t.models]


def _tick(f: ChangeFilter, summary: mesh_pb2.Telemetry, now: float) -> mesh_pb2.Telemetry | None:
    """One tick with an unbounded budget: what goes out."""
    out = f.select(summary, now)
    return None if out is None else f.sent(out, now, trimmed=False)


def test_the_first_message_is_full_then_an_idle_node_sends_nothing_until_the_heartbeat() -> None:
    f = ChangeFilter(heartbeat_s=30.0)
    first = _tick(f, _summary(a=5, b=7), 0.0)
    assert first is not None and not first.delta and _names(first) == ["a", "b"]
    for k in range(1, 15):  # 2 s ticks, nothing moves
        assert _tick(f, _summary(a=5, b=7), 2.0 * k) is None
    assert f.quiet == 14
    beat = _tick(f, _summary(a=5, b=7), 30.0)
    assert beat is not None and not beat.delta and _names(beat) == ["a", "b"]
    assert _tick(f, _summary(a=5, b=7), 32.0) is None, "an idle heartbeat needs no settle report"
    assert (f.full_sent, f.deltas_sent) == (2, 0)


def test_a_busy_copy_goes_every_tick_alone_then_once_more_when_it_goes_quiet() -> None:
    f = ChangeFilter()
    _tick(f, _summary(a=5, b=7), 0.0)
    for k, requests in enumerate([6, 9, 20], start=1):
        out = _tick(f, _summary(unix_ms=1_000 + k, a=requests, b=7), float(k))
        assert out is not None and out.delta and _names(out) == ["a"]
        assert out.unix_ms == 1_000 + k and out.models[0].requests == requests
    settle = _tick(f, _summary(a=20, b=7), 4.0)
    assert _names(settle) == ["a"], "one settle report: readers that diff counters see it idle"
    assert _tick(f, _summary(a=20, b=7), 5.0) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("in_flight", 1),
        ("errors", 1),
        ("queue_depth", 3),
        ("max_batch_size", 16),
        ("feedback_joined", 2),
        ("predictions_logged", 9),
        ("latency_p50_ms", 4.0),
    ],
)
def test_each_figure_that_moves_sends_its_entry(field: str, value: float) -> None:
    f = ChangeFilter()
    _tick(f, _summary(a=5, b=7), 0.0)
    moved = _summary(a=5, b=7)
    setattr(moved.models[1], field, value)
    assert _names(_tick(f, moved, 1.0)) == ["b"]


def test_latency_moves_under_ten_percent_and_the_node_wide_cache_counters_send_nothing() -> None:
    f = ChangeFilter()
    base = _summary(a=5)
    base.models[0].latency_p50_ms, base.models[0].latency_p99_ms = 10.0, 40.0
    _tick(f, base, 0.0)
    small = _summary(a=5)
    small.models[0].latency_p50_ms, small.models[0].latency_p99_ms = 10.9, 36.5
    small.models[0].cache_hits = 999
    assert _tick(f, small, 1.0) is None
    big = _summary(a=5)
    big.models[0].latency_p50_ms, big.models[0].latency_p99_ms = 10.0, 45.0
    assert _names(_tick(f, big, 2.0)) == ["a"]


def test_a_drift_window_sends_its_entry_and_a_new_copy_is_sent_at_once() -> None:
    f = ChangeFilter()
    _tick(f, _summary(a=5), 0.0)
    window = _summary(a=5)
    window.models[0].drift.seq = 3
    assert _names(_tick(f, window, 1.0)) == ["a"]
    assert _names(_tick(f, _summary(a=5, new=0), 2.0)) == ["new"]
    assert _tick(f, _summary(a=5, new=0), 3.0) is None


def test_the_header_alone_goes_only_on_a_large_cpu_or_memory_move() -> None:
    f = ChangeFilter()
    _tick(f, _summary(cpu=1.0, a=5), 0.0)
    assert _tick(f, _summary(cpu=20.0, a=5), 1.0) is None
    out = _tick(f, _summary(cpu=60.0, a=5), 2.0)
    assert out is not None and out.delta and _names(out) == [] and out.cpu_percent == 60.0


def test_reset_makes_the_next_message_full_and_a_gone_copy_is_forgotten() -> None:
    f = ChangeFilter()
    _tick(f, _summary(a=5, b=1), 0.0)
    assert _tick(f, _summary(a=5), 1.0) is None, "a copy gone sends nothing (its status says it)"
    f.reset()
    out = _tick(f, _summary(a=5), 2.0)
    assert out is not None and not out.delta


def test_what_the_budget_left_out_stays_due_and_a_trimmed_full_goes_as_a_delta() -> None:
    f = ChangeFilter()
    budget = TelemetryBudget(wire_size(_summary(a=5)) + 1)  # the header and one entry fit
    summary = _summary(a=5, b=7)
    offered = f.select(summary, 0.0)
    assert offered is not None
    trimmed = budget.apply(offered, 1.0)
    assert trimmed is not None and budget.last_dropped == 1
    out = f.sent(trimmed, 0.0, trimmed=True)
    assert out.delta, "a trimmed full message must not make the control plane forget copies"
    left = {m.model for m in summary.models} - {m.model for m in out.models}
    again = _tick(f, _summary(a=5, b=7), 1.0)
    assert again is not None and set(_names(again) or []) >= left
    skipped = ChangeFilter()
    assert skipped.select(_summary(a=1), 0.0) is not None
    # the budget skipped the tick (sent() not called): the full message is still due
    out2 = skipped.select(_summary(a=1), 1.0)
    assert out2 is not None and not out2.delta


# -- the control plane's side ------------------------------------------------------------------


def _session(*names: str) -> NodeSession:
    session = NodeSession(mesh_pb2.Hello(node_id="n1"), "cp-1", 16)
    for name in names:
        session.copies[(name, "v1")] = mesh_pb2.CopyStatus(
            model=name, variant="v1", state=mesh_pb2.READY
        )
    return session


def _delta(unix_ms: int, **copies: int) -> mesh_pb2.Telemetry:
    t = _summary(unix_ms, **copies)
    t.delta = True
    return t


def test_a_delta_updates_only_its_entries_and_the_header() -> None:
    session = _session("a", "b")
    session.observe(_summary(1_000, a=5, b=7))
    held = session.telemetry
    session.observe(_delta(3_000, a=9))
    t = session.telemetry
    assert t is not held and held.models[0].requests == 5, "replaced, not changed in place"
    assert not t.delta and t.unix_ms == 3_000
    assert {m.model: m.requests for m in t.models} == {"a": 9, "b": 7}
    copy_b = session.copy_telemetry(("b", "v1"))
    assert copy_b is not None and copy_b.requests == 7
    session.observe(_delta(5_000, cpu=50.0))  # the header alone
    assert session.telemetry.cpu_percent == 50.0 and len(session.telemetry.models) == 2


def test_a_full_message_replaces_the_set_and_unheld_copies_are_dropped() -> None:
    session = _session("a", "b")
    session.observe(_summary(1_000, a=5, b=7))
    session.observe(_summary(2_000, a=6))
    assert [m.model for m in session.telemetry.models] == ["a"]
    session.observe(_delta(3_000, b=8, x=1))  # x: never ordered
    assert {m.model for m in session.telemetry.models} == {"a", "b"}
    assert session.telemetry_dropped == 1
    session.report(mesh_pb2.CopyStatus(model="a", variant="v1", state=mesh_pb2.UNLOADED))
    assert [m.model for m in session.telemetry.models] == ["b"]
    assert session.copy_telemetry(("a", "v1")) is None


def test_a_drift_window_is_seen_only_with_the_message_that_carried_it() -> None:
    session = _session("a", "b")
    first = _summary(1_000, a=5, b=7)
    first.models[0].drift.seq = 4
    session.observe(first)
    assert session.telemetry.models[0].HasField("drift")
    session.observe(_delta(2_000, b=8))
    a = session.copy_telemetry(("a", "v1"))
    assert a is not None and not a.HasField("drift") and a.requests == 5
    assert first.models[0].HasField("drift"), "the received message is not changed"


def test_the_live_maps_rates_see_a_busy_copy_settle_to_zero() -> None:
    """view.Rates diffs counters by the report's unix_ms: a copy not resent reads as idle."""
    session = _session("a", "b")
    rates = Rates()

    def update() -> None:
        rates.update([mesh_pb2.NodeInfo(node_id="n1", telemetry=session.telemetry)])

    session.observe(_summary(1_000, a=0, b=0))
    update()
    session.observe(_delta(2_000, a=10))
    update()
    assert rates.of("n1", "a", "v1") == (10.0, 0.0)
    assert rates.of("n1", "b", "v1") == (0.0, 0.0)
    session.observe(_delta(3_000, a=10))  # the settle report
    update()
    assert rates.of("n1", "a", "v1") == (0.0, 0.0)
