"""Copies follow demand: the desired copy count of every variant with ``autoscaling``.

Contract (pure decisions over observations; the caller owns the clock and the state object):
- Demand is the mesh-wide number of queries in flight on the variant's copies, from node
  telemetry, smoothed (EWMA) so one sample neither adds nor removes a copy.
- need = ceil(demand / target_in_flight) (target default 4), clamped to [min_copies, max_copies]
  (max 0 = no upper bound); min_copies 0 allows scale to zero.
- Up at once when need exceeds the current count (a burst must not wait); down only after need
  stayed below the current count for ``scale_down_delay_s`` (default 30 s), then to need.
- The first decision for a variant (or after a leader change) starts from the placement's
  ``desired_copies`` when there is one, else ``max(copies, min_copies)`` -- except that
  ``min_copies`` 0 starts at 0: a variant allowed to scale to zero loads nothing until demand
  (or a waiting query) asks for a copy.
- A variant scaled to zero that a query is waiting for (``snapshot.wake``) gets at least one
  copy at once (the gateway holds the query until that copy is ready, up to its deadline).
- Variants without ``autoscaling`` are not touched (the scheduler uses ``copies``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from meshserve.controlplane.snapshot import Snapshot, VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["Autoscaler", "ScaleChange"]

_ALPHA = 0.5
_DEFAULT_TARGET = 4.0
_DEFAULT_DELAY_S = 30.0


@dataclass(frozen=True)
class ScaleChange:
    key: VariantKey
    old: int
    new: int
    demand: float


@dataclass
class _State:
    current: int
    demand: float = 0.0
    low_since: float | None = None


def enabled(spec: mesh_pb2.ModelSpec) -> bool:
    return spec.HasField("autoscaling")


class Autoscaler:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._state: dict[VariantKey, _State] = {}

    def decide(self, snapshot: Snapshot) -> tuple[dict[VariantKey, int], list[ScaleChange]]:
        """The desired copy count per autoscaled variant, and the changes made this call."""
        now = self._clock()
        demand = _demand(snapshot.in_flight)
        desired: dict[VariantKey, int] = {}
        changes: list[ScaleChange] = []
        for key, spec in snapshot.models.items():
            if not enabled(spec):
                continue
            cfg = spec.autoscaling
            low = int(cfg.min_copies)
            high = int(cfg.max_copies) or math.inf
            state = self._state.get(key)
            if state is None:
                placement = snapshot.placements.get(key)
                if placement is not None:
                    start = int(placement.desired_copies)
                elif low == 0:
                    start = 0  # scale to zero from the start: the first query wakes a copy
                else:
                    start = int(spec.copies) if spec.copies else 1
                state = self._state[key] = _State(current=int(min(max(start, low), high)))
            state.demand += _ALPHA * (demand.get(key, 0.0) - state.demand)
            target = cfg.target_in_flight or _DEFAULT_TARGET
            need = int(min(max(math.ceil(state.demand / target - 1e-9), low), high))
            if key in snapshot.wake:
                need = max(need, int(min(1, high)))
            old = state.current
            if need > state.current:
                state.current, state.low_since = need, None
            elif need < state.current:
                delay = cfg.scale_down_delay_s or _DEFAULT_DELAY_S
                if state.low_since is None:
                    state.low_since = now
                elif now - state.low_since >= delay:
                    state.current, state.low_since = need, None
            else:
                state.low_since = None
            if state.current != old:
                changes.append(ScaleChange(key, old, state.current, round(state.demand, 2)))
            desired[key] = state.current
        for key in [k for k in self._state if k not in snapshot.models]:
            del self._state[key]
        return desired, changes


def _demand(in_flight: Mapping[str, Mapping[VariantKey, float]]) -> dict[VariantKey, float]:
    total: dict[VariantKey, float] = {}
    for flights in in_flight.values():
        for key, count in flights.items():
            total[key] = total.get(key, 0.0) + count
    return total
