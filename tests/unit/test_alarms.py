"""The alarm hand-off of a replica (observe/alarms.py): telemetry scored with the policy's
settings against the snapshot's spec, events recorded by the leader only, accuracy alarms once."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from meshserve.common.policy.config import MonitoringSpec
from meshserve.controlplane import keys
from meshserve.controlplane.observe.alarms import Alarms, health_settings, open_episodes
from meshserve.controlplane.observe.episodes import (
    Episode,
    Feedback,
    Verdict,
    decode,
    encode,
    judge_accuracy,
)
from meshserve.controlplane.observe.health import HealthSettings, ModelHealth
from meshserve.controlplane.snapshot import VariantKey
from meshserve.protos import mesh_pb2
from tests.support.recorded import Recorded


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
            telemetry=lambda: {f"n{i}": t for i, t in enumerate(self.telemetry)},
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


# -- alarm episodes: the accuracy decision as a table ----------------------------------------


def _episode(labelled: int, nodes: tuple[str, ...]) -> Episode:
    return Episode("accuracy", "m", "v", labelled=labelled, accuracy=0.6433, nodes=nodes)


BOTH = frozenset({"n1", "n2"})
_JUDGE_CASES = [
    # (case, now, episode, min_accuracy, settled, verdict)
    ("no minimum accuracy in the policy: never judged", Feedback(300, 0.1, BOTH), None, None,
     True, None),
    ("a leader within its grace does not judge, however low", Feedback(300, 0.1, BOTH), None,
     0.9, False, None),
    ("fewer labelled answers than min_feedback: no judgement", Feedback(49, 0.1, BOTH), None,
     0.9, True, None),
    ("no label joined yet (accuracy -1): no judgement", Feedback(60, -1.0, BOTH), None, 0.9,
     True, None),
    ("low and no episode open: raise", Feedback(300, 0.6433, BOTH), None, 0.9, True,
     Verdict.RAISE),
    ("high and no episode open: nothing", Feedback(300, 0.95, BOTH), None, 0.9, True, None),
    ("low with the episode open: not raised twice", Feedback(300, 0.6433, BOTH),
     _episode(300, ("n1", "n2")), 0.9, True, None),
    ("low partial figure after a restart, episode open: not raised again",
     Feedback(226, 0.8451, frozenset({"n1"})), _episode(300, ("n1", "n2")), 0.9, True, None),
    ("high partial figure (one node of two, fewer labels): the episode is not cleared",
     Feedback(226, 0.95, frozenset({"n1"})), _episode(300, ("n1", "n2")), 0.9, True, None),
    ("high with every node of the episode back: cleared", Feedback(420, 0.93, BOTH),
     _episode(300, ("n1", "n2")), 0.9, True, Verdict.CLEAR),
    ("high from other nodes with as many labels as the episode: cleared",
     Feedback(300, 0.95, frozenset({"n3"})), _episode(300, ("n1", "n2")), 0.9, True,
     Verdict.CLEAR),
    ("high but within the grace: the episode stays open", Feedback(420, 0.93, BOTH),
     _episode(300, ("n1", "n2")), 0.9, False, None),
    ("an unreadable episode (no figure) clears on any sufficient high figure",
     Feedback(60, 0.95, frozenset({"n1"})), Episode("accuracy", "m", "v"), 0.9, True,
     Verdict.CLEAR),
]  # fmt: skip


@pytest.mark.parametrize(
    ("now", "episode", "min_accuracy", "settled", "verdict"),
    [case[1:] for case in _JUDGE_CASES],
    ids=[case[0] for case in _JUDGE_CASES],
)
def test_judge_accuracy(
    now: Feedback,
    episode: Episode | None,
    min_accuracy: float | None,
    settled: bool,
    verdict: Verdict | None,
) -> None:
    got = judge_accuracy(now, episode, min_accuracy=min_accuracy, min_feedback=50, settled=settled)
    assert got is verdict


def test_an_episode_round_trips_and_an_unreadable_one_reads_as_open_with_no_figure() -> None:
    episode = Episode(
        "accuracy", "m", "v", message="low", labelled=300, accuracy=0.6433, nodes=("n1", "n2"),
        unix_ms=5, replica_id="cp-1",
    )  # fmt: skip
    assert decode("accuracy", "m", "v", encode(episode)) == episode
    assert decode("drift", "m", "v", b"{not json") == Episode("drift", "m", "v")
    assert open_episodes({keys.alarm_key("drift", "m", "v"): b"{}"}) == {
        ("drift", "m", "v"): Episode("drift", "m", "v")
    }


def test_an_open_drift_episode_makes_the_state_drifting_until_enough_calm_windows() -> None:
    health = ModelHealth()
    settings = HealthSettings(windows=2)
    health.adopt_drift(frozenset({("m", "v")}))  # a restarted replica: the episode is open
    spec = _spec()
    calm = _window(1, [100, 100, 100, 100]).models[0]
    assert health.observe("n1", calm, spec, settings) is None
    assert health.drift[("m", "v")].drifting, "the first window finds the variant drifting"
    calm2 = _window(2, [100, 100, 100, 100]).models[0]
    alarm = health.observe("n1", calm2, spec, settings)
    assert alarm is not None and not alarm.raised, "cleared after 2 windows under the threshold"
    health.adopt_drift(frozenset())
    assert not health.drift[("m", "v")].drifting


def test_a_new_leader_waits_its_grace_before_judging_accuracy() -> None:
    entry = mesh_pb2.ModelTelemetry(model="m", variant="v", feedback_joined=60, feedback_correct=6)
    replica = Replica(
        MonitoringSpec(min_accuracy=0.9), telemetry=[mesh_pb2.Telemetry(models=[entry])]
    )
    now = [100.0]
    alarms = Alarms(
        monitoring=lambda: replica.monitoring,
        models=lambda: replica.models,
        telemetry=lambda: {"n1": replica.telemetry[0]},
        is_leader=lambda: replica.leading,
        events=lambda: replica.log,
        grace_s=10.0,
        clock=lambda: now[0],
    )
    alarms.check_accuracy()
    now[0] = 109.0
    alarms.check_accuracy()
    assert replica.log is not None and replica.log.events == [], "within the grace"
    now[0] = 110.0
    alarms.check_accuracy()
    assert [e[:3] for e in replica.log.events] == [("accuracy", "m", "v")]
    assert "over 60 labelled answers" in replica.log.events[0][3]
    alarms.check_accuracy()
    assert len(replica.log.events) == 1, "raised once per episode"


def test_the_episode_of_a_removed_variant_is_closed_once_and_reported_until_then() -> None:
    replica = Replica(MonitoringSpec(drift_windows=1), models={("m", "v"): _spec()})
    alarms = replica.alarms()
    alarms.on_telemetry("n1", _window(1, [400, 0, 0, 0]))
    assert replica.log is not None and [e[0] for e in replica.log.events] == ["drift"]
    fresh = ModelHealth()
    fresh.adopt_drift(frozenset({("m", "v")}))
    health = mesh_pb2.VariantHealth()
    fresh.report(("m", "v"), health)
    assert health.drifting, "an open episode shows before any window is scored"
    replica.models = {}  # the variant was removed; no node serves it any more
    alarms.check_accuracy()
    alarms.check_accuracy()
    assert [e[0] for e in replica.log.events] == ["drift", "drift"]
    assert "no longer registered" in replica.log.events[1][3]
    assert alarms.episodes() == {}
