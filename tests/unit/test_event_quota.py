"""The event ring's quotas (issue 16 §5): one kind of event about many models, or one model,
cannot erase the history of the others; the excess is dropped before any subscriber sees it."""

from __future__ import annotations

from meshserve.controlplane.observe.events import EventLog
from meshserve.controlplane.observe.quota import MAX_TRACKED, EventQuota
from meshserve.protos import mesh_pb2
from tests.support.fake_registry import FakeRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_kind_gets_a_share_of_the_ring_and_a_model_a_bounded_count() -> None:
    clock = Clock()
    quota = EventQuota(1000, kind_share=0.25, per_model=30, window_s=60.0, clock=clock)
    assert sum(quota.admit("drift", f"invented-{i}") for i in range(1200)) == 250
    assert quota.admit("placement", "m"), "another kind keeps its own share"
    assert sum(quota.admit("scale", "m") for _ in range(100)) == 30
    assert quota.refused == {"drift": 950, "scale": 70}
    clock.now = 6.0  # a tenth of the window: a tenth of each bucket back
    assert sum(quota.admit("scale", "m") for _ in range(100)) == 3
    assert sum(quota.admit("drift", f"later-{i}") for i in range(100)) == 25


def test_per_model_buckets_are_bounded() -> None:
    clock = Clock()
    quota = EventQuota(10**9, per_model=2, clock=clock)
    for i in range(3 * MAX_TRACKED):
        assert quota.admit("placement", f"m{i}")
    assert len(quota._models) <= MAX_TRACKED


def test_events_over_quota_reach_no_subscriber_and_earlier_events_stay_queued() -> None:
    log = EventLog(FakeRegistry(), "r1", capacity=1000)
    seen: list[mesh_pb2.Event] = []
    log.subscribe(seen.append)
    log.record("policy", message="applied")
    for i in range(1200):
        log.record("drift", model=f"invented-{i}", variant="default", message="drifting")
    assert sum(e.kind == "drift" for e in seen) == 250
    assert seen[0].kind == "policy"
    assert log.throttled == {"drift": 950}
    assert log.stats["pending"] == 251 and log.stats["dropped"] == 0
