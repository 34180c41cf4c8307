"""Drift sketches and scores (pure): binning, profiles, PSI/KS, and the alarm state machine."""

from __future__ import annotations

import numpy as np

from meshserve.common.sketches import (
    Binner,
    build_profile,
    ks,
    merge_counts,
    monitoring_digest,
    prediction_of,
    psi,
)
from meshserve.controlplane.observe.health import HealthSettings, ModelHealth
from meshserve.protos import mesh_pb2

RNG = np.random.default_rng(7)


def test_binning_matches_searchsorted_per_feature() -> None:
    sample = RNG.standard_normal((500, 5))
    sample[:, 3] = RNG.integers(0, 3, 500)  # few distinct values: fewer edges
    profile = build_profile(sample, None, input_name="x", bins=8)
    rows = RNG.standard_normal((300, 5)) * 1.5
    counts = Binner(profile).count_features(rows)
    for j, sketch in enumerate(profile.features):
        expected = np.bincount(
            np.searchsorted(np.array(sketch.edges), rows[:, j], side="right"),
            minlength=len(sketch.edges) + 1,
        )
        assert counts[j].tolist() == expected.tolist()
        assert sum(sketch.counts) == 500


def test_scores_are_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    ref = [100, 200, 300, 400]
    assert psi(ref, [10, 20, 30, 40]) < 1e-9 and ks(ref, [1, 2, 3, 4]) < 1e-12
    assert psi(ref, [400, 300, 200, 100]) > 0.5
    assert abs(ks(ref, [400, 300, 200, 100]) - 0.4) < 1e-9
    assert psi([5, 5], [5, 5, 5]) > 0, "different lengths are padded (a new class appeared)"
    assert psi([], [1]) == 0.0 and ks([0, 0], [1, 1]) == 0.0, "nothing to compare: no score"


def test_predictions_from_labels_scores_and_values() -> None:
    labels, classes = prediction_of(np.array([3, 1], dtype=np.int64))
    assert classes and labels.tolist() == [3, 1]
    scores, classes = prediction_of(np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32))
    assert classes and scores.tolist() == [1, 0]
    values, classes = prediction_of(np.array([[0.5], [1.5]], dtype=np.float32))
    assert not classes and values.tolist() == [0.5, 1.5]


def test_monitoring_digest_changes_with_the_settings() -> None:
    none = monitoring_digest(mesh_pb2.MonitoringConfig(), mesh_pb2.DriftProfile())
    logging = monitoring_digest(
        mesh_pb2.MonitoringConfig(log_predictions=True), mesh_pb2.DriftProfile()
    )
    assert (
        none == ""
        and logging
        and logging
        != monitoring_digest(
            mesh_pb2.MonitoringConfig(log_predictions=True), mesh_pb2.DriftProfile(input="x")
        )
    )


def _window(seq: int, rows: np.ndarray, profile: mesh_pb2.DriftProfile) -> mesh_pb2.ModelTelemetry:
    binner = Binner(profile)
    window = mesh_pb2.DriftWindow(seq=seq, rows=len(rows))
    for counts in binner.count_features(rows):
        window.features.add(counts=counts.tolist())
    return mesh_pb2.ModelTelemetry(model="m", variant="v", drift=window)


def test_alarm_after_consecutive_drifting_windows_and_clear_after_as_many_calm_ones() -> None:
    reference = RNG.standard_normal((2000, 8))
    spec = mesh_pb2.ModelSpec(
        name="m", variant="v", drift_reference=build_profile(reference, None, input_name="x")
    )
    health, settings = ModelHealth(), HealthSettings(psi_threshold=0.25, windows=2)
    calm = [
        health.observe(
            "n1", _window(i, RNG.standard_normal((250, 8)), spec.drift_reference), spec, settings
        )
        for i in range(1, 101)
    ]
    assert calm == [None] * 100, "100 windows from the reference raise nothing"
    assert health.drift[("m", "v")].max_feature_psi < 0.25
    shifted = [
        health.observe(
            "n1",
            _window(i, RNG.standard_normal((250, 8)) * 2 + 1, spec.drift_reference),
            spec,
            settings,
        )
        for i in range(101, 104)
    ]
    assert shifted[0] is None and shifted[1] is not None and shifted[1].raised
    assert "x[" in shifted[1].message
    assert (
        health.observe("n1", _window(103, reference[:250], spec.drift_reference), spec, settings)
        is None
    ), "a window is scored once per node"
    back = [
        health.observe(
            "n1", _window(i, RNG.standard_normal((250, 8)), spec.drift_reference), spec, settings
        )
        for i in range(104, 106)
    ]
    assert back[0] is None and back[1] is not None and not back[1].raised


def test_output_reference_is_captured_when_none_is_registered() -> None:
    health, settings = ModelHealth(), HealthSettings(capture_windows=2, windows=1)
    spec = mesh_pb2.ModelSpec(name="m", variant="v")

    def entry(seq: int, counts: list[int]) -> mesh_pb2.ModelTelemetry:
        window = mesh_pb2.DriftWindow(seq=seq, rows=sum(counts))
        window.output.counts.extend(counts)
        return mesh_pb2.ModelTelemetry(model="m", variant="v", drift=window)

    assert health.observe("n1", entry(1, [50, 50, 50]), spec, settings) is None
    assert health.observe("n1", entry(2, [50, 50, 50]), spec, settings) is None
    assert health.drift[("m", "v")].windows == 0, "capture windows are the reference"
    assert health.observe("n1", entry(3, [48, 52, 50]), spec, settings) is None
    alarm = health.observe("n1", entry(4, [140, 5, 5]), spec, settings)
    assert alarm is not None and alarm.raised and "output PSI" in alarm.message
    assert health.drift[("m", "v")].source == "production"


def test_merge_counts_caps_hostile_uint64_counts_instead_of_overflowing() -> None:
    """A node's counts are uint64 on the wire: 2**64 - 1 once raised OverflowError out of the
    drift scoring (found by tests/fuzz/test_nodelink.py); now each count is capped."""
    huge = 2**64 - 1
    merged = merge_counts([[huge, 1], [huge, 2, 3]])
    assert merged == [2 * 2**53, 3, 3]
    assert merge_counts([[1, 2], [3]]) == [4, 2]
