"""SLO-aware model switching: which variant answers a query (pure; no I/O).

Contract:
- :func:`predict_seconds` estimates when a new query would complete on one ready copy, from the
  latency profile the node measured at warm-up (median run time per batch size on its own
  hardware), the copy's live queue (the larger of this gateway's in-flight count and the node's
  reported one) and how the copy runs: batched copies serve ``ceil((q + 1) / B)`` batches of up to
  ``B`` rows, unbatched ones ``ceil((q + 1) / parallel)`` runs; plus a fixed transport overhead.
  The latency this gateway recently observed on the copy (peak-sensitive, decaying within about
  a second) is a floor: a profile measured on an idle node underestimates a saturated one.
- :meth:`Switcher.choose` returns, among variants that reach ``min_accuracy``, the most accurate
  whose best ready copy is predicted within the budget; if none fits, the fastest (an SLO miss).
  Hysteresis: after stepping down, a model steps back up to a more accurate variant only when
  that variant is predicted within ``headroom`` x budget, so choices do not flap at the edge.
  With no budget: the most accurate ready variant. No variant can ever meet ``min_accuracy`` ->
  :class:`~protos.status.FailedPrecondition` naming the best accuracy on offer.
- Cost: O(ready copies of the model); microseconds for a handful of variants.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from protos import mesh_pb2
from protos.status import FailedPrecondition

__all__ = ["Choice", "CopyLoad", "Switcher", "VariantOption", "predict_seconds"]

TRANSPORT_S = 0.0015  # gateway + node hops beyond compute (measured p50 here: ~1.6 ms)


@dataclass(frozen=True, slots=True)
class CopyLoad:
    node_id: str
    profile: Mapping[int, float]  # batch size -> median run seconds (may be empty)
    queued: int  # queries ahead of a new one on this copy
    batched: bool
    max_batch: int = 1
    parallel: int = 1  # runs a node executes at once for this copy
    observed_s: float = 0.0  # this gateway's recent latency on the copy (a floor; 0 = none)


@dataclass(frozen=True, slots=True)
class VariantOption:
    spec: mesh_pb2.ModelSpec
    copies: Sequence[CopyLoad]


@dataclass(frozen=True, slots=True)
class Choice:
    spec: mesh_pb2.ModelSpec
    predicted_s: float  # best ready copy's predicted completion (inf: no estimate)
    fits: bool | None  # None: no budget given
    reason: str


def _run_time(profile: Mapping[int, float], rows: int) -> float:
    """Interpolated run time for ``rows`` (linear between measured sizes, extrapolated per row
    beyond the largest)."""
    if not profile:
        return 0.0
    sizes = sorted(profile)
    if rows <= sizes[0]:
        return profile[sizes[0]]
    for low, high in itertools.pairwise(sizes):
        if rows <= high:
            frac = (rows - low) / (high - low)
            return profile[low] + frac * (profile[high] - profile[low])
    top = sizes[-1]
    return profile[top] * rows / top


def predict_seconds(copy: CopyLoad, transport_s: float = TRANSPORT_S) -> float:
    ahead = copy.queued + 1
    if not copy.profile:
        if copy.observed_s <= 0:
            return math.inf
        return copy.observed_s * math.ceil(ahead / max(1, copy.parallel))
    if copy.batched and copy.max_batch > 1:
        batch = min(ahead, copy.max_batch)
        rounds = math.ceil(math.ceil(ahead / copy.max_batch) / max(1, copy.parallel))
        return max(rounds * _run_time(copy.profile, batch) + transport_s, copy.observed_s)
    rounds = math.ceil(ahead / max(1, copy.parallel))
    return max(rounds * _run_time(copy.profile, 1) + transport_s, copy.observed_s)


class Switcher:
    def __init__(self, *, headroom: float = 0.8, transport_s: float = TRANSPORT_S) -> None:
        self._headroom = headroom
        self._transport_s = transport_s
        self._level: dict[str, float] = {}  # model -> accuracy of the variant last chosen

    def choose(
        self,
        model: str,
        options: Sequence[VariantOption],
        slo_s: float | None,
        min_accuracy: float | None = None,
    ) -> Choice:
        if not options:
            raise ValueError("no variants")
        floor = min_accuracy or 0.0
        eligible = [o for o in options if o.spec.accuracy >= floor - 1e-12]
        if not eligible:
            best = max(o.spec.accuracy for o in options)
            raise FailedPrecondition(
                f"model {model!r}: no variant reaches min_accuracy {floor:g} "
                f"(the most accurate has {best:g})"
            )
        ranked = sorted(eligible, key=lambda o: (-o.spec.accuracy, o.spec.variant))
        predicted = [
            (min((predict_seconds(c, self._transport_s) for c in o.copies), default=math.inf), o)
            for o in ranked
        ]
        ready = [(p, o) for p, o in predicted if o.copies]
        if not ready:
            return Choice(ranked[0].spec, math.inf, None, "no ready copy yet")
        if slo_s is None:
            p, o = ready[0]
            return Choice(o.spec, p, None, "most accurate (no SLO)")
        level = self._level.get(model)
        for p, o in ready:
            stepping_up = level is not None and o.spec.accuracy > level + 1e-12
            budget = slo_s * self._headroom if stepping_up else slo_s
            if p <= budget:
                self._level[model] = o.spec.accuracy
                why = "most accurate within SLO" if o is ready[0][1] else "switched to meet SLO"
                return Choice(o.spec, p, True, why)
        p, o = min(ready, key=lambda item: item[0])
        self._level[model] = o.spec.accuracy
        return Choice(o.spec, p, False, "none fits: fastest")
