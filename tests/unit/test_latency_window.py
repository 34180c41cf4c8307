"""A copy's latency window (node/copy_entry.py): the p50/p99 its telemetry reports, over the
latest answers only -- bounded in count and in age."""

from __future__ import annotations

from meshserve.node.copy_entry import LatencyWindow


def test_percentiles_of_the_recent_answers() -> None:
    window = LatencyWindow()
    assert window.percentiles(now=0.0) == (0.0, 0.0)
    for i in range(1, 101):  # 1 ms .. 100 ms
        window.record(i / 1000, now=1.0)
    p50, p99 = window.percentiles(now=1.0)
    assert round(p50) == 50 and round(p99) == 99


def test_old_answers_age_out_and_the_count_is_bounded() -> None:
    window = LatencyWindow()
    window.record(0.5, now=0.0)  # 500 ms, long ago
    window.record(0.002, now=LatencyWindow.AGE_S + 1)
    assert window.percentiles(now=LatencyWindow.AGE_S + 1) == (2.0, 2.0)
    for _ in range(LatencyWindow.SIZE * 3):
        window.record(0.001, now=100.0)
    assert len(window._samples) == LatencyWindow.SIZE
