"""Drift and accuracy alarms of one control-plane replica: the hand-off from live telemetry to
:class:`~meshserve.controlplane.observe.health.ModelHealth`, and from its alarms to the event log.

Contract:

* :meth:`Alarms.on_telemetry` is the hub's telemetry hook: it scores every drift window a node's
  telemetry carries against the variant's spec in the current snapshot, with the settings of the
  policy in force (read once per message, only when a window is present). It never raises for
  data a node sent and never blocks: scoring is pure arithmetic on small count vectors.
* :meth:`Alarms.check_accuracy` is one step of the replica's maintenance pass: feedback counters
  summed over the nodes this replica holds streams to (every node links to every replica) become
  accuracy alarms.
* Every alarm is recorded as an event (kind ``drift`` or ``accuracy``) by the **leader only**:
  every replica scores the same windows, so one event is enough; the webhook follows the events.
  A replica that is not leading still keeps its health state, so ``meshctl model accuracy`` is
  served by any replica and a new leader starts from the same scores.
* :meth:`Alarms.watch` exports the live scores as gauges read at collection time:
  ``meshserve.model.accuracy`` (``model``, ``variant``) and ``meshserve.drift.psi`` (``model``,
  ``variant``, ``signal``: ``output`` or ``max_feature``). The gauges hold the alarms weakly.
* No I/O of its own: the event log (:class:`~meshserve.controlplane.observe.events.EventSink`)
  is the seam; everything else arrives through the callables given at construction, which are
  read at call time (the replica builds its parts after this object).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

from opentelemetry import metrics

from meshserve.common.instruments import Reading, SharedObservable
from meshserve.common.policy.config import MonitoringSpec
from meshserve.controlplane.observe.events import EventSink
from meshserve.controlplane.observe.health import (
    Alarm,
    HealthSettings,
    ModelHealth,
    feedback_totals,
)
from meshserve.controlplane.snapshot import VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["Alarms", "health_settings"]


def health_settings(monitoring: MonitoringSpec) -> HealthSettings:
    """The scoring settings a policy's ``monitoring`` section asks for."""
    return HealthSettings(
        psi_threshold=monitoring.drift_psi_threshold,
        windows=monitoring.drift_windows,
        capture_windows=monitoring.capture_windows,
        min_accuracy=monitoring.min_accuracy,
        min_feedback=monitoring.min_feedback,
    )


class Alarms:
    """Scores telemetry into :attr:`health` and records the alarms it raises (see the module
    contract)."""

    def __init__(
        self,
        *,
        monitoring: Callable[[], MonitoringSpec],
        models: Callable[[], Mapping[VariantKey, mesh_pb2.ModelSpec]],
        telemetry: Callable[[], list[mesh_pb2.Telemetry]],
        is_leader: Callable[[], bool],
        events: Callable[[], EventSink | None],
        health: ModelHealth | None = None,
    ) -> None:
        """``monitoring``: the policy's monitoring section in force; ``models``: the specs of the
        current snapshot; ``telemetry``: the latest telemetry of every node streaming to this
        replica (a copied list: the gauges read it from the exporter's thread); ``is_leader``:
        whether this replica leads now; ``events``: the event log once it is started."""
        self.health = health if health is not None else ModelHealth()
        self._monitoring = monitoring
        self._models = models
        self._telemetry = telemetry
        self._is_leader = is_leader
        self._events = events

    def settings(self) -> HealthSettings:
        return health_settings(self._monitoring())

    def on_telemetry(self, node_id: str, telemetry: mesh_pb2.Telemetry) -> None:
        """Score the drift windows a node's telemetry carries."""
        settings: HealthSettings | None = None
        models: Mapping[VariantKey, mesh_pb2.ModelSpec] | None = None
        for entry in telemetry.models:
            if not entry.HasField("drift"):
                continue
            settings = settings or self.settings()
            models = models if models is not None else self._models()
            spec = models.get((entry.model, entry.variant))
            alarm = self.health.observe(node_id, entry, spec, settings)
            if alarm is not None:
                self.record(alarm)

    def feedback(self) -> dict[VariantKey, mesh_pb2.VariantHealth]:
        """Feedback counters per variant, summed over the nodes streaming to this replica."""
        return feedback_totals(self._telemetry())

    def check_accuracy(self) -> None:
        """Raise or clear accuracy alarms from the feedback the nodes have joined so far."""
        for alarm in self.health.accuracy_alarms(self.feedback(), self.settings()):
            self.record(alarm)

    def record(self, alarm: Alarm) -> None:
        """Record ``alarm`` as an event, if this replica leads and its event log runs."""
        events = self._events()
        if events is not None and self._is_leader():
            events.record(
                alarm.kind, model=alarm.model, variant=alarm.variant, message=alarm.message
            )

    def watch(self) -> None:
        """Export this replica's scores as gauges for as long as this object lives."""
        accuracy, drift = _gauges()
        accuracy.watch(self, _accuracy_readings)
        drift.watch(self, _psi_readings)


@functools.cache
def _gauges() -> tuple[SharedObservable, SharedObservable]:
    """The process's two health gauges (created on first use: one instrument per name)."""
    meter = metrics.get_meter("meshserve.controlplane")
    accuracy = SharedObservable(
        meter,
        "meshserve.model.accuracy",
        "gauge",
        "1",
        "live accuracy from feedback joined to logged predictions",
    )
    drift = SharedObservable(
        meter,
        "meshserve.drift.psi",
        "gauge",
        "1",
        "population stability index of the latest sketch window",
    )
    return accuracy, drift


def _accuracy_readings(alarms: Alarms) -> Iterable[Reading]:
    return [
        (h.accuracy, {"model": k[0], "variant": k[1]})
        for k, h in alarms.feedback().items()
        if h.feedback_joined
    ]


def _psi_readings(alarms: Alarms) -> Iterable[Reading]:
    out: list[Reading] = []
    for (model, variant), state in list(alarms.health.drift.items()):
        if state.output_psi >= 0:
            out.append((state.output_psi, {"model": model, "variant": variant, "signal": "output"}))
        if state.features:
            attrs = {"model": model, "variant": variant, "signal": "max_feature"}
            out.append((state.max_feature_psi, attrs))
    return out
