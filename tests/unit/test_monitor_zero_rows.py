"""Zero-row queries are not held by the drift monitor: nothing of them waits for real traffic,
and the windows count real rows only."""

from __future__ import annotations

import numpy as np

from meshserve.node.monitor import CopyMonitor
from meshserve.protos import mesh_pb2


def _monitor() -> CopyMonitor:
    profile = mesh_pb2.DriftProfile(input="x")
    for j in range(4):
        profile.features.add(name=f"x[{j}]", edges=[-1.0, 0.0, 1.0])
    config = mesh_pb2.MonitoringConfig(drift_window_rows=100)
    return CopyMonitor("m", "v", config, profile, ["probabilities"])


def test_zero_row_queries_are_not_buffered() -> None:
    monitor = _monitor()
    empty_in = np.zeros((0, 4), np.float32)
    empty_out = np.zeros((0, 3), np.float32)
    for _ in range(10_000):
        monitor.observe({"x": empty_in}, {"probabilities": empty_out})
    assert monitor.pending == 0
    assert not monitor.windows


def test_windows_count_only_real_rows_among_zero_row_queries() -> None:
    monitor = _monitor()
    rng = np.random.default_rng(5)
    for _ in range(10):  # 100 real rows, a zero-row query after each real one
        rows = rng.standard_normal((10, 4)).astype(np.float32)
        monitor.observe({"x": rows}, {"probabilities": rng.random((10, 3)).astype(np.float32)})
        monitor.observe(
            {"x": np.zeros((0, 4), np.float32)}, {"probabilities": np.zeros((0, 3), np.float32)}
        )
    assert [w.rows for w in monitor.windows] == [100]
    assert [sum(f.counts) for f in monitor.windows[0].features] == [100] * 4
    assert monitor.pending == 0
