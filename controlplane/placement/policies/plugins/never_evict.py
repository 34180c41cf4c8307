"""Eviction: never. A variant short of its minimum for lack of memory waits for room (a node
joining, a model removed, copies scaled down) instead of taking it from other variants."""

from __future__ import annotations

from meshserve.common.policy.eviction import NeverEvictParams
from meshserve.controlplane.placement.policies.plugins import Shortfall, Victim


class NeverEvict:
    name = "never"

    def __init__(self, params: NeverEvictParams | None = None) -> None:
        self.params = params or NeverEvictParams()

    def victims(self, q: Shortfall) -> tuple[Victim, ...]:
        return ()
