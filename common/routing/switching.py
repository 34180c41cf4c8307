"""SLO-aware model switching: which variant of a version answers a query (pure; no I/O).

The options are the variants of the one version a query resolves to (:mod:`.resolve`: a named
version, an alias and its canary, or the model's ``live`` alias): switching never crosses
versions, so rollouts and switching compose.

Contract:
- :func:`predict_seconds` estimates when a new query would complete on one ready copy, from the
  latency profile the node measured at warm-up (median run time per batch size on its own
  hardware), the copy's live queue (the larger of this gateway's in-flight count and the node's
  reported one) and how the copy runs: batched copies serve ``ceil((q + 1) / B)`` batches of up to
  ``B`` rows, unbatched ones ``ceil((q + 1) / parallel)`` runs; plus a fixed transport overhead.
  A profile is measured on an idle node; under load the same run takes longer (cores shared
  with other copies, the gateway, clients). :class:`Calibration` learns, per copy, the ratio of
  observed latency to the profile's prediction at dispatch, and predictions are scaled by it.
- :func:`choose_variant` returns, among variants that reach ``min_accuracy``, the most accurate
  whose best ready copy is predicted within ``safety`` x the budget (the prediction is a median;
  the margin covers the tail); if none fits, the fastest (an SLO miss).
  Hysteresis: after stepping down, a model steps back up to a more accurate variant only when
  that variant is predicted within ``headroom`` x budget, so choices do not flap at the edge;
  :class:`Switcher` keeps each model's level (the accuracy last chosen under a budget) between
  queries, the one piece of state here.
  With no budget: the most accurate ready variant. No variant can ever meet ``min_accuracy`` ->
  :class:`~meshserve.common.errors.FailedPrecondition` naming the best accuracy on offer.
- Cost: O(ready copies of the model); microseconds for a handful of variants.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from meshserve.common.errors import FailedPrecondition
from meshserve.protos import mesh_pb2

__all__ = [
    "HEADROOM",
    "SAFETY",
    "TRANSPORT_S",
    "Calibration",
    "Choice",
    "CopyLoad",
    "Switcher",
    "VariantOption",
    "choose_variant",
    "predict_seconds",
]

TRANSPORT_S = 0.0015  # gateway + node hops beyond compute (measured p50 here: ~1.6 ms)


@dataclass(frozen=True, slots=True)
class CopyLoad:
    node_id: str
    profile: Mapping[int, float]  # batch size -> median run seconds (may be empty)
    queued: int  # queries ahead of a new one on this copy
    batched: bool
    max_batch: int = 1
    parallel: int = 1  # runs a node executes at once for this copy
    observed_s: float = 0.0  # this gateway's recent latency on the copy (used without a profile)
    slowdown: float = 1.0  # learned observed / predicted ratio (see Calibration)


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
        return rounds * _run_time(copy.profile, batch) * copy.slowdown + transport_s
    rounds = math.ceil(ahead / max(1, copy.parallel))
    return rounds * _run_time(copy.profile, 1) * copy.slowdown + transport_s


class Calibration:
    """Per copy: how much slower than its profile predicts it answers right now.

    :meth:`observe` takes the profile-based prediction made at dispatch (slowdown 1) and the
    latency observed; :meth:`factor` is an EWMA of their ratio, clamped to [0.5, 50], that decays
    back towards 1 while the copy is not observed (time constant ``decay_s``)."""

    def __init__(
        self,
        *,
        alpha: float = 0.2,
        decay_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._alpha = alpha
        self._decay_s = decay_s
        self._clock = clock
        self._ratio: dict[Hashable, tuple[float, float]] = {}  # key -> (ratio, when)

    def factor(self, key: Hashable) -> float:
        entry = self._ratio.get(key)
        if entry is None:
            return 1.0
        ratio, when = entry
        weight = math.exp(-(self._clock() - when) / self._decay_s)
        return 1.0 + (ratio - 1.0) * weight

    def observe(self, key: Hashable, predicted_s: float, actual_s: float) -> None:
        if predicted_s <= 0 or not math.isfinite(predicted_s):
            return
        sample = min(max(actual_s / predicted_s, 0.5), 50.0)
        current = self.factor(key)
        self._ratio[key] = (current + self._alpha * (sample - current), self._clock())

    def forget(self, keep: Callable[[Hashable], bool]) -> None:
        for key in [k for k in self._ratio if not keep(k)]:
            del self._ratio[key]


SAFETY = 0.45  # a prediction (a median) must fit within this share of the budget
HEADROOM = 0.8  # stepping back up needs the prediction within this share of that again


def choose_variant(
    model: str,
    options: Sequence[VariantOption],
    slo_s: float | None,
    min_accuracy: float | None = None,
    *,
    level: float | None = None,
    safety: float = SAFETY,
    headroom: float = HEADROOM,
    transport_s: float = TRANSPORT_S,
) -> Choice:
    """The variant a query to ``model`` gets (the contract above). ``level``: the accuracy of
    the variant last chosen for the model (hysteresis; None: none yet)."""
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
        (min((predict_seconds(c, transport_s) for c in o.copies), default=math.inf), o)
        for o in ranked
    ]
    ready = [(p, o) for p, o in predicted if o.copies]
    if not ready:
        return Choice(ranked[0].spec, math.inf, None, "no ready copy yet")
    if slo_s is None:
        p, o = ready[0]
        return Choice(o.spec, p, None, "most accurate (no SLO)")
    for p, o in ready:
        stepping_up = level is not None and o.spec.accuracy > level + 1e-12
        budget = slo_s * safety * (headroom if stepping_up else 1.0)
        if p <= budget:
            why = "most accurate within SLO" if o is ready[0][1] else "switched to meet SLO"
            return Choice(o.spec, p, True, why)
    p, o = min(ready, key=lambda item: item[0])
    return Choice(o.spec, p, False, "none fits: fastest")


class Switcher:
    """:func:`choose_variant` with the hysteresis level of each model kept between queries."""

    def __init__(
        self,
        *,
        safety: float = SAFETY,
        headroom: float = HEADROOM,
        transport_s: float = TRANSPORT_S,
    ) -> None:
        self._safety = safety
        self._headroom = headroom
        self._transport_s = transport_s
        # (model, version) -> accuracy of the variant last chosen: each version has its own
        # variants, so a rollout starts the new version without the old one's level
        self._level: dict[tuple[str, str], float] = {}

    def level(self, model: str, version: str = "") -> float | None:
        """The accuracy of the variant last chosen for ``model``'s ``version`` with a budget
        (None: none)."""
        return self._level.get((model, version))

    def levels(self, model: str) -> dict[str, float]:
        """:meth:`level` of each version of ``model`` that has one."""
        return {v: level for (m, v), level in self._level.items() if m == model}

    def choose(
        self,
        model: str,
        options: Sequence[VariantOption],
        slo_s: float | None,
        min_accuracy: float | None = None,
        *,
        version: str = "",
        commit: bool = True,
    ) -> Choice:
        """:func:`choose_variant` among the variants of ``model``'s ``version`` (``options``);
        ``commit=False`` answers without moving that version's hysteresis level (explain)."""
        choice = choose_variant(
            model,
            options,
            slo_s,
            min_accuracy,
            level=self._level.get((model, version)),
            safety=self._safety,
            headroom=self._headroom,
            transport_s=self._transport_s,
        )
        if commit and choice.fits is not None:
            self._level[(model, version)] = choice.spec.accuracy
        return choice
