"""The node's prediction log: sampled records on rotating files, feedback joins (once), and
records logged before a restart still join."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from meshserve.node.monitor import CopyMonitor, PredictionLog
from meshserve.protos import mesh_pb2


def _monitor(**config: object) -> CopyMonitor:
    return CopyMonitor(
        "digits",
        "fast",
        mesh_pb2.MonitoringConfig(log_predictions=True, **config),  # type: ignore[arg-type]
        mesh_pb2.DriftProfile(),
        ["label", "probabilities"],
    )


def _answer(label: int) -> dict[str, np.ndarray]:
    return {
        "label": np.array([label], dtype=np.int64),
        "probabilities": np.eye(10, dtype=np.float32)[[label]],
    }


def test_feedback_joins_once_and_counts_correct_answers(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path)
    log.open()
    monitor = _monitor()
    x = {"x": np.zeros((1, 64), dtype=np.float32)}
    ids = [log.record("", monitor, x, _answer(i % 10), "n1") for i in range(20)]
    assert len(set(ids)) == 20 and all(ids), "ids are assigned when the query had none"
    assert log.record("mine", monitor, x, _answer(3), "n1") == "mine"
    truth = {rid: (i % 10 if i < 15 else 0) for i, rid in enumerate(ids)}  # 5 wrong (15..19)
    joined = [
        log.join("digits", mesh_pb2.FeedbackItem(request_id=r, label=t)) for r, t in truth.items()
    ]
    assert all(joined)
    again = log.join("digits", mesh_pb2.FeedbackItem(request_id=ids[0], label=0))
    assert not again, "an outcome joins once"
    assert not log.join("digits", mesh_pb2.FeedbackItem(request_id="unknown", label=1))
    counts = log.counts[("digits", "fast")]
    assert (counts.joined, counts.correct, counts.logged) == (20, 15, 21)
    log.close()
    record = json.loads((tmp_path / "predictions-00000001.jsonl").read_text().splitlines()[0])
    assert record["inputs"]["x"]["shape"] == [1, 64], "inputs are summarised unless allowed"
    assert record["prediction"] == 0 and record["variant"] == "fast"


def test_records_rotate_within_the_bound_and_survive_a_restart(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, max_file_bytes=4096, max_files=3)
    log.open()
    monitor = _monitor(log_inputs=True)
    x = {"x": np.arange(64, dtype=np.float32)[None, :]}
    ids = [log.record(f"r{i}", monitor, x, _answer(1), "n1") for i in range(100)]
    log.close()
    files = sorted(tmp_path.glob("predictions-*.jsonl"))
    assert len(files) == 3 and all(f.stat().st_size <= 4096 for f in files)
    restarted = PredictionLog(tmp_path, max_file_bytes=4096, max_files=3)
    restarted.open()
    assert not restarted.join("digits", mesh_pb2.FeedbackItem(request_id=ids[0], label=1)), (
        "rotated away: no longer joins"
    )
    assert restarted.join("digits", mesh_pb2.FeedbackItem(request_id=ids[-1], label=1)), (
        "logged before the restart: still joins"
    )
    assert restarted.counts[("digits", "fast")].correct == 1
    restarted.close()


def test_value_feedback_sums_absolute_errors(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path)
    log.open()
    monitor = CopyMonitor(
        "price",
        "v1",
        mesh_pb2.MonitoringConfig(log_predictions=True),
        mesh_pb2.DriftProfile(),
        ["y"],
    )
    rid = log.record("", monitor, {}, {"y": np.array([[2.5]], dtype=np.float32)}, "n1")
    assert log.join("price", mesh_pb2.FeedbackItem(request_id=rid, value=4.0))
    assert log.counts[("price", "v1")].abs_error == 1.5
    log.close()


def test_drift_windows_close_every_window_rows_and_only_hold_counts() -> None:
    profile = mesh_pb2.DriftProfile(input="x")
    for j in range(4):
        profile.features.add(name=f"x[{j}]", edges=[-1.0, 0.0, 1.0])
    monitor = CopyMonitor(
        "m", "v", mesh_pb2.MonitoringConfig(drift_window_rows=100), profile, ["probabilities"]
    )
    rng = np.random.default_rng(3)
    for _ in range(25):  # 250 rows in queries of 10
        rows = rng.standard_normal((10, 4)).astype(np.float32)
        monitor.observe({"x": rows}, {"probabilities": rng.random((10, 3)).astype(np.float32)})
    assert [w.rows for w in monitor.windows] == [100, 100]
    first = monitor.windows[0]
    assert [sum(f.counts) for f in first.features] == [100] * 4
    assert sum(first.output.counts) == 100 and len(first.output.counts) <= 3
    newest = monitor.window_after(0)
    assert newest is monitor.windows[-1] and monitor.window_after(newest.seq) is None


def test_request_ids_are_per_tenant_and_feedback_joins_only_its_tenants(tmp_path: Path) -> None:
    """Two tenants pick the same id; each one's feedback joins its own prediction only, an
    admin's (no tenant) neither, and a restart keeps whose each record is."""
    log = PredictionLog(tmp_path)
    log.open()
    monitor = _monitor()
    x = {"x": np.zeros((1, 64), dtype=np.float32)}
    log.record("order-1", monitor, x, _answer(1), "n1", "acme")
    log.record("order-1", monitor, x, _answer(2), "n1", "globex")
    log.record("order-2", monitor, x, _answer(3), "n1", "acme")
    item = mesh_pb2.FeedbackItem
    assert not log.join("digits", item(request_id="order-2", label=0), "globex"), "acme's id"
    assert not log.join("digits", item(request_id="order-2", label=0)), "no tenant: not acme's"
    assert log.join("digits", item(request_id="order-1", label=2), "globex")
    log.close()
    restarted = PredictionLog(tmp_path)
    restarted.open()
    assert not restarted.join("digits", item(request_id="order-2", label=0), "globex")
    assert restarted.join("digits", item(request_id="order-1", label=1), "acme")
    assert restarted.join("digits", item(request_id="order-2", label=3), "acme")
    assert restarted.counts[("digits", "fast")].correct == 2, "acme's two, both right"
    restarted.close()
