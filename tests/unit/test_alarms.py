"""The alarm hand-off of a replica (observe/alarms.py): telemetry scored with the policy's
settings against the snapshot's spec, events recorded by the leader only, accuracy alarms once."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.common.policy.config import MonitoringSpec
from meshserve.controlplane.observe.alarms import Alarms, health_settings
from meshserve.controlplane.snapshot import VariantKey
from meshserve.protos import mesh_pb2


@dataclass
class Recorded:
    events: list[tuple[str, str, str, str]] = field(default_factory=list)

    def record(
        self, kind: str, *, model: str = "", variant: str = "", node_id: str = "", message: str = ""
    ) -> None:
        self.events.append((kind, model, variant, message))


@dataclass
class Replica:
    """The state an :class:`Alarms` reads through its callables."""

    monitoring: MonitoringSpec
    models: dict[VariantKey, mesh_pb2.ModelSpec] = field(default_factory=dict)
    telemetry: list[mesh_pb2.Telemetry] = field(default_factory=list)
    leading: bool = True
    log: Recorded | None = field(default_factory=Recorded)

    def alarms(self) -> Alarms:
        return Alarms(
            monitoring=lambda: self.monitoring,
            models=lambda: self.models,
            telemetry=lambda: self.telemetry,
            is_leader=lambda: self.leading,
            events=lambda: self.log,
        )


def _spec() -> mesh_pb2.ModelSpec:
    reference = mesh_pb2.DriftProfile(output=mesh_pb2.Sketch(counts=[100, 100, 100, 100]))
    return mesh_pb2.ModelSpec(name="m", variant="v", drift_reference=reference)


def _window(seq: int, counts: list[int]) -> mesh_pb2.Telemetry:
    window = mesh_pb2.DriftWindow(
        seq=seq, rows=sum(counts), output=mesh_pb2.SketchCounts(counts=counts)
    )
    return mesh_pb2.Telemetry(
        models=[mesh_pb2.ModelTelemetry(model="m", variant="v", drift=window)]
    )


def test_settings_follow_the_policys_monitoring_section() -> None:
    spec = MonitoringSpec(
        drift_psi_threshold=0.5, drift_windows=3, capture_windows=4, min_accuracy=0.8
    )
    settings = health_settings(spec)
    assert (settings.psi_threshold, settings.windows, settings.capture_windows) == (0.5, 3, 4)
    assert (settings.min_accuracy, settings.min_feedback) == (0.8, 50)


def test_a_drifting_window_raises_one_event_on_the_leader_with_the_policys_window_count() -> None:
    replica = Replica(MonitoringSpec(drift_windows=2), models={("m", "v"): _spec()})
    alarms = replica.alarms()
    alarms.on_telemetry("n1", _window(1, [400, 0, 0, 0]))
    assert replica.log is not None and replica.log.events == [], "one window of two: no alarm yet"
    alarms.on_telemetry("n2", _window(1, [400, 0, 0, 0]))  # same seq, other node: a new window
    assert [e[:3] for e in replica.log.events] == [("drift", "m", "v")]
    assert "n2" in replica.log.events[0][3]
    alarms.on_telemetry("n2", _window(1, [400, 0, 0, 0]))  # the same window again: ignored
    assert len(replica.log.events) == 1 and alarms.health.drift[("m", "v")].drifting


def test_a_follower_scores_but_records_nothing() -> None:
    replica = Replica(MonitoringSpec(drift_windows=1), models={("m", "v"): _spec()}, leading=False)
    alarms = replica.alarms()
    alarms.on_telemetry("n1", _window(1, [0, 0, 0, 400]))
    assert replica.log is not None and replica.log.events == []
    assert alarms.health.drift[("m", "v")].drifting and alarms.health.drift[("m", "v")].windows == 1
    replica.log = None  # before the event log runs: nothing to record into, nothing raised
    replica.leading = True
    alarms.on_telemetry("n1", _window(2, [100, 100, 100, 100]))


def test_accuracy_alarms_once_below_the_minimum_and_clears_once_above() -> None:
    def node(correct: int) -> mesh_pb2.Telemetry:
        entry = mesh_pb2.ModelTelemetry(
            model="m", variant="v", feedback_joined=30, feedback_correct=correct
        )
        return mesh_pb2.Telemetry(models=[entry])

    replica = Replica(MonitoringSpec(min_accuracy=0.9, min_feedback=50))
    alarms = replica.alarms()
    replica.telemetry = [node(15)]
    alarms.check_accuracy()
    assert replica.log is not None and replica.log.events == [], "30 labels < min_feedback 50"
    replica.telemetry = [node(15), node(15)]  # summed over nodes: 60 labels, accuracy 0.5
    alarms.check_accuracy()
    alarms.check_accuracy()
    assert [e[:3] for e in replica.log.events] == [("accuracy", "m", "v")]
    assert alarms.feedback()[("m", "v")].accuracy == 0.5
    replica.telemetry = [node(30), node(29)]
    alarms.check_accuracy()
    assert [e[:3] for e in replica.log.events] == [("accuracy", "m", "v")] * 2
    assert "back to" in replica.log.events[1][3]
