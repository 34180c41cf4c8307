"""Power of two choices on live load (meshserve.common.routing.balance), on hand-fed
observations."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshserve.common.routing.balance import Balancer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _key(node: str) -> tuple[str, str, str]:
    return (node, "m", "default")


def _observe(b: Balancer, node: str, latency: float, times: int = 5) -> None:
    for _ in range(times):
        b.started(_key(node))
        b.finished(_key(node), latency)


def test_one_candidate_is_returned_and_none_is_refused() -> None:
    b = Balancer(rng=random.Random(1))
    assert b.pick(["a"], _key) == "a"
    with pytest.raises(ValueError):
        b.pick([], _key)


def test_the_fast_copy_gets_almost_every_query() -> None:
    clock = Clock()
    b = Balancer(rng=random.Random(2), clock=clock)
    _observe(b, "fast", 0.002)
    _observe(b, "slow", 0.050)
    picks = Counter(b.pick(["fast", "slow"], _key) for _ in range(200))
    assert picks["fast"] == 200


def test_in_flight_and_queue_depth_shift_load_to_the_idle_copy() -> None:
    b = Balancer(rng=random.Random(3), clock=Clock())
    _observe(b, "a", 0.005)
    _observe(b, "b", 0.005)
    for _ in range(4):
        b.started(_key("a"))
    assert b.in_flight(_key("a")) == 4
    assert all(b.pick(["a", "b"], _key) == "b" for _ in range(50))
    depth = {"a": 0, "b": 10}
    for _ in range(4):
        b.finished(_key("a"), 0.005)
    assert all(b.pick(["a", "b"], _key, lambda n: depth[n]) == "a" for _ in range(50))


def test_equal_copies_share_the_load() -> None:
    b = Balancer(rng=random.Random(4), clock=Clock())
    nodes = ["a", "b", "c", "d"]
    for n in nodes:
        _observe(b, n, 0.004)
    picks = Counter()
    for _ in range(400):
        node = b.pick(nodes, _key)
        picks[node] += 1
        b.started(_key(node))  # held: in-flight grows where traffic goes
    assert set(picks) == set(nodes)
    assert max(picks.values()) - min(picks.values()) <= 10


def test_an_idle_slow_copy_decays_and_is_probed_again() -> None:
    clock = Clock()
    b = Balancer(rng=random.Random(5), clock=clock, decay_s=2.0)
    _observe(b, "slow", 0.050)
    _observe(b, "fast", 0.002)
    assert b.cost(_key("slow")) > b.cost(_key("fast"))
    clock.now += 20.0  # "slow" unheard of for 10 time constants; "fast" too, both decayed
    _observe(b, "fast", 0.002)
    assert b.cost(_key("slow")) < b.cost(_key("fast"))


def test_a_failure_makes_a_copy_look_slow_and_stats_can_be_forgotten() -> None:
    b = Balancer(rng=random.Random(6), clock=Clock())
    _observe(b, "a", 0.002)
    _observe(b, "b", 0.002)
    b.started(_key("a"))
    b.finished(_key("a"), 0.001, ok=False)
    assert b.cost(_key("a")) > b.cost(_key("b"))
    b.forget(lambda k: k[0] != "a")
    assert b.cost(_key("a")) == b.cost(_key("never-seen"))
