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
from meshserve.controlplane.snapshot import EMBEDDED, Snapshot, VariantKey
from meshserve.protos import mesh_pb2

__all__ = [
    "Flying",
    "Telemetered",
    "flights_of",
    "latest_telemetry",
    "live_in_flight",
    "model_health",
    "node_list",
]


class Telemetered(Protocol):
    """What the readers need of a node's stream: the last telemetry it reported."""

    @property
    def telemetry(self) -> mesh_pb2.Telemetry: ...


class Flying(Protocol):
    """A node's stream with its copies' queries in flight, as of its last telemetry
    (:func:`flights_of` of it, kept by the stream when the telemetry arrives)."""

    @property
    def flights(self) -> Mapping[VariantKey, float]: ...


def flights_of(telemetry: mesh_pb2.Telemetry) -> dict[VariantKey, float]:
    """Queries in flight per variant in one node's telemetry; a copy with none is left out
    (``in_flight`` counts every query the copy holds, its batcher's queue included)."""
    return {(m.model, m.variant): float(m.in_flight) for m in telemetry.models if m.in_flight}


def live_in_flight(sessions: Mapping[str, Flying]) -> dict[str, dict[VariantKey, float]]:
    """Queries in flight per node and variant (the autoscaler's live demand, read by every
    scheduling pass); a node or copy with none in flight is left out, and so is an embedded
    member (its queries are its own, not demand on the mesh's copies: its stream keeps no
    flights). Reads what each stream kept (:func:`flights_of`), so a pass over 10,000 idle
    nodes decodes no telemetry."""
    return {node_id: dict(s.flights) for node_id, s in list(sessions.items()) if s.flights}


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


def _live_progress(info: mesh_pb2.NodeInfo, session: Telemetered) -> None:
    """Download progress of LOADING copies from the node's live stream (etcd records leave it
    out: it would add a revision every half second)."""
    live = getattr(session, "copies", None)
    if not isinstance(live, Mapping):
        return
    for copy in info.copies:
        status = live.get((copy.model, copy.variant))
        if isinstance(status, mesh_pb2.CopyStatus) and status.state == copy.state:
            copy.bytes_fetched = status.bytes_fetched
            copy.bytes_total = status.bytes_total or copy.bytes_total


def node_list(
    snapshot: Snapshot, sessions: Mapping[str, Telemetered]
) -> mesh_pb2.ListNodesResponse:
    """Every node of the view, by id, with its effective labels, its copies and (when it streams
    to this replica) its latest telemetry and the labels its Hello claimed; embedded members
    (``snapshot.members``) are listed among them with ``kind`` "embedded" and their models."""
    out = mesh_pb2.ListNodesResponse()
    everyone = {**snapshot.nodes, **snapshot.members}
    for node_id in sorted(everyone):
        node = everyone[node_id]
        member = node_id in snapshot.members and node_id not in snapshot.nodes
        info = out.nodes.add(
            node_id=node_id,
            labels=dict(node.labels),
            direct_address=node.direct_address,
            replicas=sorted(node.replicas),
            draining=node_id in snapshot.draining,
            kind=EMBEDDED if member else "",
        )
        info.hardware.CopyFrom(node.hardware)
        info.copies.extend(node.copies[k] for k in sorted(node.copies))
        session = sessions.get(node_id)
        if session is not None:
            info.telemetry.CopyFrom(session.telemetry)
            _live_progress(info, session)
            hello = getattr(session, "hello", None)
            if isinstance(hello, mesh_pb2.Hello):  # what it claims: shown, not matched
                info.reported_labels.update(hello.labels)
                if member:
                    info.embedded.extend(hello.embedded)
    return out
