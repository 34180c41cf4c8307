"""Model health: drift scores from the nodes' sketch windows, live accuracy from joined feedback.

Contract:

* :meth:`ModelHealth.observe` scores one closed window a node sent (``ModelTelemetry.drift``)
  against the variant's reference: per input feature and for the output, the population
  stability index and the binned Kolmogorov-Smirnov distance (:mod:`meshserve.common.sketches`). A
  window
  is scored once (by node and sequence number): every link of a node carries the same windows.
* The output reference is the variant's registered profile (``ModelSpec.drift_reference``) when
  it has output counts, else it is captured from the first ``capture_windows`` windows seen
  (prediction drift with no profile at all; kept in this replica's memory). Input features are
  scored only against a registered profile (nodes sketch inputs only then). A new profile
  restarts the variant's state.
* A variant is *drifting* once ``windows`` consecutive windows score above ``psi_threshold``
  (the largest of its feature and output PSIs) and is *clear* again after as many consecutive
  windows below it. Each change of state is returned once, as an :class:`Alarm`.
* The alarm state outlives a replica in etcd (open episodes, :mod:`.episodes`): the caller
  passes the variants whose drift episode is open to :meth:`ModelHealth.adopt_drift`, so a
  restarted replica or a new leader starts from *drifting* and a state it builds later (a first
  window, a new profile) starts from it too; only ``windows`` windows under the threshold clear.
* :func:`feedback_totals` sums the feedback counters of the nodes; the accuracy decision on them
  is :func:`.episodes.judge_accuracy`.
* Pure: no I/O, no clock. The caller records alarms (the leader only) and serves the state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from meshserve.common.sketches import ks, merge_counts, psi
from meshserve.controlplane.snapshot import VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["Alarm", "HealthSettings", "ModelHealth", "VariantDrift", "feedback_totals"]

_TOP_FEATURES = 20
_SEEN_LIMIT = 4096


@dataclass(frozen=True)
class HealthSettings:
    psi_threshold: float = 0.25
    windows: int = 2  # consecutive windows over (or under) the threshold to change state
    capture_windows: int = 3  # windows that make an output reference when none is registered
    min_accuracy: float | None = None
    min_feedback: int = 50


@dataclass(frozen=True)
class Alarm:
    kind: str  # "drift" or "accuracy"
    model: str
    variant: str
    raised: bool  # True: crossed into alarm; False: cleared
    message: str
    # accuracy: the figure the alarm was judged on (kept with the episode it opens)
    labelled: int = 0
    accuracy: float = -1.0
    nodes: tuple[str, ...] = ()


@dataclass
class VariantDrift:
    reference: mesh_pb2.DriftProfile
    reference_key: bytes
    captured: list[list[int]] = field(default_factory=list)
    windows: int = 0
    output_psi: float = -1.0
    features: list[tuple[str, float, float]] = field(default_factory=list)  # name, psi, ks
    over: int = 0
    under: int = 0
    drifting: bool = False
    seen: set[tuple[str, int]] = field(default_factory=set)

    @property
    def max_feature_psi(self) -> float:
        return max((f[1] for f in self.features), default=-1.0)

    @property
    def source(self) -> str:
        if self.reference.output.counts or self.reference.features:
            return self.reference.source or "registered"
        if self.captured:
            return "production"
        return ""


class ModelHealth:
    def __init__(self) -> None:
        self.drift: dict[VariantKey, VariantDrift] = {}
        self._open_drift: frozenset[VariantKey] = frozenset()

    def adopt_drift(self, open_episodes: frozenset[VariantKey]) -> None:
        """Take the stored alarm state: exactly the variants in ``open_episodes`` are drifting
        (their consecutive-window counts restart)."""
        self._open_drift = open_episodes
        for key, state in self.drift.items():
            drifting = key in open_episodes
            if state.drifting != drifting:
                state.drifting, state.over, state.under = drifting, 0, 0

    def _state(self, key: VariantKey, spec: mesh_pb2.ModelSpec | None) -> VariantDrift:
        reference = spec.drift_reference if spec is not None else mesh_pb2.DriftProfile()
        state = self.drift.get(key)
        if state is not None and state.reference is reference:
            return state  # the same spec object: unchanged (the snapshot keeps unchanged specs)
        ref_key = reference.SerializeToString(deterministic=True)
        if state is None or state.reference_key != ref_key:
            state = self.drift[key] = VariantDrift(reference, ref_key)
            state.drifting = key in self._open_drift  # an open episode outlives a new profile
        return state

    def observe(
        self,
        node_id: str,
        entry: mesh_pb2.ModelTelemetry,
        spec: mesh_pb2.ModelSpec | None,
        settings: HealthSettings,
    ) -> Alarm | None:
        """Score ``entry.drift`` (if any, and not seen yet); the alarm it raises or clears."""
        if not entry.HasField("drift") or not entry.drift.rows:
            return None
        key = (entry.model, entry.variant)
        state = self._state(key, spec)
        window = entry.drift
        mark = (node_id, window.seq)
        if mark in state.seen:
            return None
        if len(state.seen) >= _SEEN_LIMIT:
            state.seen.clear()
        state.seen.add(mark)
        ref = state.reference
        output_ref: list[int] = list(ref.output.counts)
        current_output = list(window.output.counts)
        if not output_ref and current_output:
            if len(state.captured) < settings.capture_windows:
                state.captured.append(current_output)
                return None  # this window is part of the reference
            output_ref = merge_counts(state.captured)
        state.windows += 1
        if output_ref and current_output:
            state.output_psi = psi(output_ref, current_output)
        scored = []
        if len(window.features) == len(ref.features):
            for sketch, counts in zip(ref.features, window.features, strict=True):
                scored.append(
                    (
                        sketch.name,
                        psi(sketch.counts, counts.counts),
                        ks(sketch.counts, counts.counts),
                    )
                )
        state.features = sorted(scored, key=lambda f: -f[1])
        worst = max(state.output_psi, state.max_feature_psi)
        if worst > settings.psi_threshold:
            state.over, state.under = state.over + 1, 0
        else:
            state.over, state.under = 0, state.under + 1
        if not state.drifting and state.over >= settings.windows:
            state.drifting = True
            return Alarm("drift", key[0], key[1], True, _describe(state, settings, node_id))
        if state.drifting and state.under >= settings.windows:
            state.drifting = False
            return Alarm(
                "drift",
                key[0],
                key[1],
                False,
                f"drift cleared: {settings.windows} windows under PSI {settings.psi_threshold:g}",
            )
        return None

    def report(self, key: VariantKey, health: mesh_pb2.VariantHealth) -> None:
        """Fill ``health``'s drift fields from this replica's state of ``key``."""
        state = self.drift.get(key)
        health.output_psi = -1.0
        health.max_feature_psi = -1.0
        if state is None:
            health.drifting = key in self._open_drift  # an open episode, no window scored yet
            return
        health.windows = state.windows
        health.output_psi = state.output_psi
        health.max_feature_psi = state.max_feature_psi
        health.drifting = state.drifting
        health.reference_source = state.source
        for name, p, k in state.features[:_TOP_FEATURES]:
            health.features.add(name=name, psi=p, ks=k)


def _describe(state: VariantDrift, settings: HealthSettings, node_id: str) -> str:
    parts = []
    if state.output_psi > settings.psi_threshold:
        parts.append(f"output PSI {state.output_psi:.3f}")
    top = [f for f in state.features if f[1] > settings.psi_threshold][:3]
    if top:
        parts.append("features " + ", ".join(f"{n} PSI {p:.3f}" for n, p, _ in top))
    return (
        f"drift: {'; '.join(parts) or 'PSI over threshold'} (threshold "
        f"{settings.psi_threshold:g}, {settings.windows} windows; last from node {node_id})"
    )


def feedback_totals(
    telemetry: Iterable[mesh_pb2.Telemetry], model: str = ""
) -> dict[VariantKey, mesh_pb2.VariantHealth]:
    """Feedback counters summed over nodes, per variant (accuracy -1 when no labels joined)."""
    out: dict[VariantKey, mesh_pb2.VariantHealth] = {}
    errors: dict[VariantKey, float] = {}
    for t in telemetry:
        for m in t.models:
            if model and m.model != model:
                continue
            key = (m.model, m.variant)
            h = out.setdefault(key, mesh_pb2.VariantHealth(variant=m.variant))
            h.feedback_joined += m.feedback_joined
            h.feedback_correct += m.feedback_correct
            h.predictions_logged += m.predictions_logged
            errors[key] = errors.get(key, 0.0) + m.feedback_abs_error
    for key, h in out.items():
        h.accuracy = h.feedback_correct / h.feedback_joined if h.feedback_joined else -1.0
        h.mean_abs_error = errors[key] / h.feedback_joined if errors[key] else -1.0
    return out
