"""The control plane's OpenTelemetry instruments (no-ops until a meter provider is configured,
see :func:`meshserve.common.process.configure_metrics`); the gateway's request counts and latency
are
:class:`meshserve.common.instruments.RequestMetrics`, decision events ``meshserve.events``
(:mod:`meshserve.controlplane.observe.events`).

===============================  ==============  ============================================
name                             kind, unit      attributes
===============================  ==============  ============================================
meshserve.placement.decisions    counter         model, variant, action: place (a copy added
                                                 to a node), unplace (a copy taken off one),
                                                 evict (taken off for another variant), remove
                                                 (model unregistered), scale (autoscaler)
meshserve.copy.evictions         counter         model, variant: copies evicted for another
meshserve.scheduler.duration     histogram, s    one scheduling pass of the leader (the view
                                                 read, the decisions, their etcd write)
meshserve.scheduler.decision     histogram, s    the decisions of a pass alone: autoscaler
                                                 and placement over the view (pure, no I/O)
meshserve.node_streams           gauge (obs.)    replica: node streams open on a replica
meshserve.node.reports_refused   counter         what: copy_status (a copy never ordered, or
                                                 not with the ordered sha256), telemetry_entry
                                                 (about a copy the node does not hold),
                                                 telemetry_budget (a message over the node's
                                                 budget); see controlplane/link/trust.py
===============================  ==============  ============================================
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from opentelemetry import metrics
from opentelemetry.metrics import Meter

from meshserve.common.instruments import SECONDS_BUCKETS, Reading, SharedObservable
from meshserve.controlplane.snapshot import VariantKey

__all__ = ["ControlPlaneMetrics", "controlplane_metrics"]


#: Finer buckets for the decisions of a pass (milliseconds matter: the 10 ms target at 10,000
#: nodes, bench/scale_soak.py).
DECISION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class _HoldsStreams(Protocol):
    @property
    def replica_id(self) -> str: ...

    @property
    def sessions(self) -> Mapping[str, object]: ...


class ControlPlaneMetrics:
    """Every control-plane instrument, created once (see :func:`controlplane_metrics`); tests
    pass their own meter."""

    def __init__(self, meter: Meter) -> None:
        self._decisions = meter.create_counter(
            "meshserve.placement.decisions",
            unit="{decision}",
            description="placement changes the scheduling leader wrote, by action",
        )
        self._evictions = meter.create_counter(
            "meshserve.copy.evictions",
            unit="{copy}",
            description="copies evicted to make room for another variant's minimum",
        )
        self._pass = meter.create_histogram(
            "meshserve.scheduler.duration",
            unit="s",
            description="one scheduling pass of the leader",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self._decision = meter.create_histogram(
            "meshserve.scheduler.decision",
            unit="s",
            description="the decisions of one scheduling pass (autoscaler and placement, no I/O)",
            explicit_bucket_boundaries_advisory=DECISION_BUCKETS,
        )
        self._refused = meter.create_counter(
            "meshserve.node.reports_refused",
            unit="{report}",
            description="what nodes reported that the control plane did not believe, by what",
        )
        self._streams = SharedObservable(
            meter, "meshserve.node_streams", "gauge", "{stream}", "node streams open"
        )

    def decided(self, key: VariantKey, action: str, count: int = 1) -> None:
        """``count`` placement decisions of kind ``action`` about ``key`` were written."""
        if count > 0:
            self._decisions.add(count, {"model": key[0], "variant": key[1], "action": action})

    def placed(self, key: VariantKey, before: Sequence[str], after: Sequence[str]) -> None:
        """A placement of ``key`` moved from nodes ``before`` to ``after``."""
        self.decided(key, "place", len(set(after) - set(before)))
        self.decided(key, "unplace", len(set(before) - set(after)))

    def evicted(self, key: VariantKey) -> None:
        self.decided(key, "evict")
        self._evictions.add(1, {"model": key[0], "variant": key[1]})

    def refused(self, what: str, count: int = 1) -> None:
        """``count`` reports of kind ``what`` from a node were not believed (dropped)."""
        if count > 0:
            self._refused.add(count, {"what": what})

    def scheduled(self, seconds: float) -> None:
        """A scheduling pass took ``seconds``."""
        self._pass.record(seconds)

    def decided_in(self, seconds: float) -> None:
        """A pass's decisions (no I/O) took ``seconds``."""
        self._decision.record(seconds)

    def watch_streams(self, hub: _HoldsStreams) -> None:
        """Report how many node streams ``hub`` holds, while it lives."""
        self._streams.watch(hub, _stream_readings)


def _stream_readings(hub: _HoldsStreams) -> Iterable[Reading]:
    return [(float(len(hub.sessions)), {"replica": hub.replica_id})]


@functools.cache
def controlplane_metrics() -> ControlPlaneMetrics:
    """The process's control-plane instruments (created on first use)."""
    return ControlPlaneMetrics(metrics.get_meter("meshserve.controlplane"))
