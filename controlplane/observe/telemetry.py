"""Reading the nodes' latest telemetry, as held by this replica's node streams.

Every node links to every replica, so one replica's streams see every node: the leader plans
from its own, and any replica answers health queries from its own.

Contract: pure reads over a mapping of node id → anything with a ``telemetry`` message (the hub's
sessions); nothing is sent, stored or mutated. A node with no stream here has no entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from meshserve.controlplane.observe.health import feedback_totals
from meshserve.controlplane.snapshot import VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["Telemetered", "latest_telemetry", "live_in_flight", "model_health"]


class Telemetered(Protocol):
    """What the readers need of a node's stream: the last telemetry it reported."""

    @property
    def telemetry(self) -> mesh_pb2.Telemetry: ...


def live_in_flight(sessions: Mapping[str, Telemetered]) -> dict[str, dict[VariantKey, float]]:
    """Queries in flight per node and variant (the autoscaler's live demand); a node or copy
    with none in flight is left out."""
    out: dict[str, dict[VariantKey, float]] = {}
    for node_id, session in list(sessions.items()):
        flights = {  # in_flight counts every query the copy holds, batcher queue included
            (m.model, m.variant): float(m.in_flight)
            for m in session.telemetry.models
            if m.in_flight
        }
        if flights:
            out[node_id] = flights
    return out


def latest_telemetry(sessions: Mapping[str, Telemetered]) -> list[mesh_pb2.Telemetry]:
    """The latest telemetry of every node, as a copied list: gauges read it from the metrics
    exporter's thread while the event loop changes the mapping."""
    return [s.telemetry for s in list(sessions.values())]


def model_health(
    model: str, specs: Iterable[mesh_pb2.ModelSpec], sessions: Mapping[str, Telemetered]
) -> mesh_pb2.ModelHealthResponse:
    """One entry per variant in ``specs`` (the registered variants of ``model``), by variant
    name: the feedback the nodes joined (summed over nodes; accuracy and mean absolute error -1
    when none joined) beside the accuracy the variant was registered with."""
    totals = feedback_totals(latest_telemetry(sessions), model)
    out = mesh_pb2.ModelHealthResponse()
    for spec in sorted(specs, key=lambda v: v.variant):
        health = out.variants.add()
        health.CopyFrom(
            totals.get((spec.name, spec.variant))
            or mesh_pb2.VariantHealth(variant=spec.variant, accuracy=-1, mean_abs_error=-1)
        )
        health.registered_accuracy = spec.accuracy
    return out
