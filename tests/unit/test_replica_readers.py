"""The replica's small readers moved out of app.py: the policy in force, hot-reloaded from the
mirrored YAML (placement/policy_source.py), and the reads of the nodes' latest telemetry
(observe/telemetry.py). Pure; a dict stands in for the etcd mirror."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from meshserve.common.policy.config import DEFAULT_POLICY
from meshserve.controlplane import keys
from meshserve.controlplane.observe.telemetry import (
    flights_of,
    latest_telemetry,
    live_in_flight,
    model_health,
)
from meshserve.controlplane.placement.policy_source import PolicySource
from meshserve.protos import mesh_pb2


@dataclass
class Mirror:
    """What a PrefixMirror of keys.POLICY shows: the stored YAML and its mod revision."""

    text: bytes | None = None
    revision: int = 0
    reads: int = 0  # how often the value was read (parsed at most once per read)

    def store(self, text: bytes | None, revision: int) -> None:
        self.text, self.revision = text, revision

    def items(self) -> Mapping[str, bytes]:
        self.reads += 1
        return {} if self.text is None else {keys.POLICY: self.text}

    def mod_revisions(self) -> Mapping[str, int]:
        return {} if self.text is None else {keys.POLICY: self.revision}


@dataclass
class Sources:
    mirror: Mirror = field(default_factory=Mirror)

    def source(self) -> PolicySource:
        return PolicySource(lambda: self.mirror)


def test_no_stored_policy_is_the_built_in_default() -> None:
    assert Sources().source().current() is DEFAULT_POLICY


def test_a_stored_policy_is_parsed_once_per_revision() -> None:
    s = Sources()
    source = s.source()
    s.mirror.store(b"name: edge-first\n", 5)
    first = source.current()
    assert first.name == "edge-first"
    assert source.current() is first and s.mirror.reads == 1  # same revision: not read again
    s.mirror.store(b"name: spread\n", 9)
    assert source.current().name == "spread" and s.mirror.reads == 2


@pytest.mark.parametrize(
    "bad",
    [b"name: [unclosed\n", b"\xff\xfe not utf-8", b"rules: 3\n"],
    ids=["yaml", "bytes", "schema"],
)
def test_a_stored_policy_that_does_not_parse_keeps_the_last_good_one(
    bad: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    s = Sources()
    source = s.source()
    s.mirror.store(b"name: good\n", 3)
    good = source.current()
    s.mirror.store(bad, 4)
    with caplog.at_level(logging.ERROR, "meshserve.controlplane"):
        assert source.current() is good
    assert "stored policy (rev 4) is invalid, keeping the last" in caplog.text
    assert source.current() is good and s.mirror.reads == 2  # the bad revision is not re-parsed
    s.mirror.store(b"name: fixed\n", 6)
    assert source.current().name == "fixed"


def test_a_deleted_policy_brings_the_default_back() -> None:
    s = Sources()
    source = s.source()
    s.mirror.store(b"name: good\n", 3)
    assert source.current().name == "good"
    s.mirror.store(None, 0)
    assert source.current() is DEFAULT_POLICY


@dataclass
class Session:
    telemetry: mesh_pb2.Telemetry

    @property
    def flights(self) -> dict[tuple[str, str], float]:
        return flights_of(self.telemetry)


def telemetry(*copies: tuple[str, str, int], joined: int = 0, correct: int = 0) -> Session:
    t = mesh_pb2.Telemetry()
    for model, variant, in_flight in copies:
        t.models.add(
            model=model,
            variant=variant,
            in_flight=in_flight,
            feedback_joined=joined,
            feedback_correct=correct,
        )
    return Session(t)


def test_live_in_flight_lists_only_copies_with_queries() -> None:
    sessions = {
        "edge": telemetry(("mlp", "v1", 3), ("mlp", "v2", 0)),
        "core": telemetry(("mlp", "v1", 0)),
        "gpu": telemetry(("big", "default", 7), ("mlp", "v2", 1)),
    }
    assert live_in_flight(sessions) == {
        "edge": {("mlp", "v1"): 3.0},
        "gpu": {("big", "default"): 7.0, ("mlp", "v2"): 1.0},
    }
    assert live_in_flight({}) == {}


def test_latest_telemetry_is_a_copied_list() -> None:
    sessions = {"edge": telemetry(("mlp", "v1", 1))}
    out = latest_telemetry(sessions)
    sessions["core"] = telemetry()
    assert out == [sessions["edge"].telemetry]


def test_model_health_sums_feedback_over_nodes_beside_the_registered_accuracy() -> None:
    specs = [
        mesh_pb2.ModelSpec(name="mlp", variant="v2", accuracy=0.9),
        mesh_pb2.ModelSpec(name="mlp", variant="v1", accuracy=0.8),
    ]
    sessions = {
        "edge": telemetry(("mlp", "v1", 0), joined=10, correct=6),
        "core": telemetry(("mlp", "v1", 0), ("other", "v2", 0), joined=10, correct=8),
    }
    out = model_health("mlp", specs, sessions)
    assert [h.variant for h in out.variants] == ["v1", "v2"]
    v1, v2 = out.variants
    assert (v1.feedback_joined, v1.feedback_correct) == (20, 14)
    assert v1.accuracy == pytest.approx(0.7)
    assert v1.registered_accuracy == pytest.approx(0.8)
    # no joined feedback for v2 (another model's counters do not count): -1, not 0
    assert (v2.feedback_joined, v2.accuracy, v2.mean_abs_error) == (0, -1, -1)
    assert v2.registered_accuracy == pytest.approx(0.9)
