"""Which ready copy answers a query: power of two choices on live load (pure; no I/O).

Contract:
- :meth:`Balancer.pick` samples two distinct candidates at random and returns the one with the
  lower *cost*; with one candidate it returns it. Two random choices keep a fleet balanced almost
  as well as scanning every copy, at O(1) per query and without herding every gateway onto the
  same "least loaded" copy.
- cost = (gateway in-flight + the node's reported queue depth + 1) x latency estimate, where the
  estimate is a peak-sensitive moving average of this gateway's observed latencies to that copy
  (a slower answer raises it at once, faster ones lower it gradually). A copy not heard from for a
  while decays towards zero, so a once-slow copy is probed again rather than starved forever.
- :meth:`Balancer.started` / :meth:`Balancer.finished` bracket every forwarded query; ``finished``
  is called exactly once per ``started``, on success or failure.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Balancer"]

T = TypeVar("T")
CopyKey = tuple[str, str, str]  # node, model, variant


@dataclass(slots=True)
class _Stat:
    in_flight: int = 0
    ewma_s: float = 0.0
    updated: float = 0.0


class Balancer:
    def __init__(
        self,
        *,
        alpha: float = 0.3,
        decay_s: float = 5.0,
        prior_s: float = 0.001,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``alpha``: weight of a new (faster) sample; ``decay_s``: time constant after which an
        idle copy's estimate has fallen to 1/e; ``prior_s``: estimate of a copy never measured."""
        self._alpha = alpha
        self._decay_s = decay_s
        self._prior_s = prior_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._stats: dict[CopyKey, _Stat] = {}

    def cost(self, key: CopyKey, queue_depth: int = 0) -> float:
        stat = self._stats.get(key)
        if stat is None:
            return (queue_depth + 1) * self._prior_s
        estimate = self._decayed(stat, self._decay_s) if stat.in_flight == 0 else stat.ewma_s
        return (stat.in_flight + queue_depth + 1) * max(estimate, 1e-6)

    def _decayed(self, stat: _Stat, tau_s: float) -> float:
        """The estimate faded by the time since the copy last answered (time constant tau)."""
        return stat.ewma_s * math.exp(-(self._clock() - stat.updated) / tau_s)

    def pick(
        self,
        candidates: Sequence[T],
        key: Callable[[T], CopyKey],
        queue_depth: Callable[[T], int] = lambda _: 0,
    ) -> T:
        if not candidates:
            raise ValueError("no candidates")
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(range(len(candidates)), 2)
        first, second = candidates[a], candidates[b]
        cost_a = self.cost(key(first), queue_depth(first))
        cost_b = self.cost(key(second), queue_depth(second))
        return first if cost_a <= cost_b else second

    def started(self, key: CopyKey) -> None:
        stat = self._stats.get(key)
        if stat is None:
            stat = self._stats[key] = _Stat(ewma_s=self._prior_s, updated=self._clock())
        stat.in_flight += 1

    def finished(self, key: CopyKey, latency_s: float, ok: bool = True) -> None:
        stat = self._stats[key]
        stat.in_flight -= 1
        now = self._clock()
        if not ok:  # a failing copy looks slow until it answers well again
            latency_s = max(latency_s, stat.ewma_s * 2, self._prior_s * 10)
        if latency_s >= stat.ewma_s:
            stat.ewma_s = latency_s  # peak-sensitive: slowness shows at once
        else:
            stat.ewma_s += self._alpha * (latency_s - stat.ewma_s)
        stat.updated = now

    def observed(self, key: CopyKey, decay_s: float | None = None) -> float:
        """This gateway's latency estimate for a copy, seconds (0: never measured); like the
        cost, it decays while no answer arrives (time constant ``decay_s``, default the
        balancer's), so a copy once slow is tried again."""
        stat = self._stats.get(key)
        if stat is None:
            return 0.0
        return self._decayed(stat, decay_s or self._decay_s)

    def in_flight(self, key: CopyKey) -> int:
        stat = self._stats.get(key)
        return 0 if stat is None else stat.in_flight

    def forget(self, keep: Callable[[CopyKey], bool]) -> None:
        """Drop the statistics of copies ``keep`` rejects (bounded memory as copies come and go)."""
        for k in [k for k in self._stats if not keep(k) and self._stats[k].in_flight == 0]:
            del self._stats[k]
