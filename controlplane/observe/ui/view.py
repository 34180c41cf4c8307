"""What the live map shows, as JSON-ready dicts: pure functions of one replica's own view.

Contract (the page's side is ``static/README.md``; the shapes are ``docs/ui.md``'s):

* :func:`mesh_state` builds the whole ``State`` document from the replica's snapshot, its node
  streams' latest telemetry (via :func:`~meshserve.controlplane.observe.telemetry.node_list`),
  its open alarm episodes, the replicas' records and the gateway's SLO tallies. Nothing here
  reads etcd or sends anything: one call per push, shared by every open page.
* Rates (req/s, errors/s, the live mix of variants, the SLO hit rate) are differences of the
  nodes' cumulative counters between two of their telemetry reports, kept by :class:`Rates`
  (the one stateful part; owned by the UI server, fed once per push). A node whose report did
  not change keeps its last rate; a counter that went back (a restarted node) starts over.
* Nothing secret leaves: no artifact URIs (they may carry credentials), no tokens, no sha256s;
  copy failure reasons and event messages are the ones ``meshctl`` shows an admin.
* :func:`event_doc` and :func:`explain_doc` shape an event and an explanation the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict

from meshserve.common.routing.resolve import alias_state
from meshserve.common.routing.rollout import version_of
from meshserve.controlplane.observe.episodes import Episode, EpisodeKey
from meshserve.controlplane.observe.telemetry import Telemetered, node_list
from meshserve.controlplane.snapshot import EMBEDDED, Snapshot, VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["Rates", "SloTally", "event_doc", "explain_doc", "mesh_state"]

#: (node, model, variant) -> a copy's counters
_CopyKey = tuple[str, str, str]


@dataclass
class _Sample:
    unix_ms: int
    requests: int
    errors: int
    rps: float = 0.0
    errors_per_s: float = 0.0


class Rates:
    """Per-copy req/s and errors/s from successive telemetry reports (see the module contract).
    Entries of copies no longer reported are dropped at each :meth:`update`."""

    def __init__(self) -> None:
        self._samples: dict[_CopyKey, _Sample] = {}

    def update(self, nodes: Iterable[mesh_pb2.NodeInfo]) -> None:
        seen: set[_CopyKey] = set()
        for node in nodes:
            at = node.telemetry.unix_ms
            for m in node.telemetry.models:
                key = (node.node_id, m.model, m.variant)
                seen.add(key)
                last = self._samples.get(key)
                if last is None or m.requests < last.requests or m.errors < last.errors:
                    self._samples[key] = _Sample(at, m.requests, m.errors)
                    continue
                if at <= last.unix_ms:
                    continue  # the same report: keep its rate
                seconds = (at - last.unix_ms) / 1000
                self._samples[key] = _Sample(
                    at,
                    m.requests,
                    m.errors,
                    (m.requests - last.requests) / seconds,
                    (m.errors - last.errors) / seconds,
                )
        for key in self._samples.keys() - seen:
            del self._samples[key]

    def of(self, node_id: str, model: str, variant: str) -> tuple[float, float]:
        """(req/s, errors/s) of one copy; zeros when unknown."""
        sample = self._samples.get((node_id, model, variant))
        return (0.0, 0.0) if sample is None else (sample.rps, sample.errors_per_s)


class SloTally:
    """The SLO hit rate per model over the last pushes, from cumulative (met, total) counts
    (the gateway's): the share met between the oldest and newest of ``window`` readings."""

    def __init__(self, window: int = 10) -> None:
        self._window = window
        self._history: dict[str, list[tuple[int, int]]] = {}

    def update(self, counts: Mapping[str, tuple[int, int]]) -> None:
        for model, reading in counts.items():
            history = self._history.setdefault(model, [])
            history.append(reading)
            del history[: -self._window]
        for model in self._history.keys() - counts.keys():
            del self._history[model]

    def hit_rate(self, model: str) -> float | None:
        history = self._history.get(model)
        if not history:
            return None
        first, last = history[0], history[-1]
        if len(history) == 1:
            first = (0, 0)
        total = last[1] - first[1]
        return None if total <= 0 else round((last[0] - first[0]) / total, 4)


def _state_name(copy: mesh_pb2.CopyStatus) -> str:
    if copy.state == mesh_pb2.LOADING:
        fetching = copy.bytes_total and copy.bytes_fetched < copy.bytes_total
        return "pulling" if fetching else "loading"
    if copy.state == mesh_pb2.READY:
        return "ready"
    if copy.state == mesh_pb2.FAILED:
        return "failed"
    if copy.state == mesh_pb2.UNLOADED:
        return "unloaded"
    return "unknown"


def _copy_doc(
    node_id: str,
    copy: mesh_pb2.CopyStatus,
    spec: mesh_pb2.ModelSpec | None,
    load: mesh_pb2.ModelTelemetry | None,
    rates: Rates,
) -> dict[str, Any]:
    state = _state_name(copy)
    rps, errors = rates.of(node_id, copy.model, copy.variant)
    progress = None
    if state == "pulling":
        progress = round(copy.bytes_fetched / copy.bytes_total, 3)
    return {
        "model": copy.model,
        "variant": copy.variant,
        "version": version_of(spec) if spec is not None else "",
        "state": state,
        "progress": progress,
        "memory_bytes": copy.memory_bytes,
        "reason": copy.reason if state in ("failed", "unloaded") else "",
        "provider": copy.execution_provider,
        "rps": round(rps, 2),
        "errors_per_s": round(errors, 2),
        "p50_ms": round(load.latency_p50_ms, 3) if load is not None else None,
        "p99_ms": round(load.latency_p99_ms, 3) if load is not None else None,
        "queue_depth": load.queue_depth if load is not None else 0,
        "in_flight": load.in_flight if load is not None else 0,
    }


def _node_doc(
    info: mesh_pb2.NodeInfo, snapshot: Snapshot, linked: bool, rates: Rates
) -> dict[str, Any]:
    labels = dict(info.labels)
    tunneled = not info.direct_address
    reported = linked and info.telemetry.unix_ms > 0  # its first telemetry came
    loads = {(m.model, m.variant): m for m in info.telemetry.models} if linked else {}
    copies = [
        _copy_doc(
            info.node_id,
            copy,
            snapshot.models.get((copy.model, copy.variant)),
            loads.get((copy.model, copy.variant)),
            rates,
        )
        for copy in info.copies
    ]
    return {
        "id": info.node_id,
        "tier": labels.get("tier") or ("edge" if tunneled else "core"),
        "zone": labels.get("zone", ""),
        "labels": labels,
        "address": info.direct_address,
        "tunneled": tunneled,
        "embedded": info.kind == EMBEDDED,  # an application member: never placed onto
        "linked": linked,
        "draining": info.draining,
        "cpu_percent": round(info.telemetry.cpu_percent, 1) if reported else None,
        "memory_used_bytes": info.telemetry.rss_bytes if reported else None,
        "memory_total_bytes": info.hardware.memory_bytes,
        "providers": list(info.hardware.execution_providers),
        "rps": round(sum(c["rps"] for c in copies), 2),
        "copies": copies,
    }


def _model_docs(
    snapshot: Snapshot,
    nodes: list[dict[str, Any]],
    linked: Mapping[str, object],
    episodes: Mapping[EpisodeKey, Episode],
    slo: SloTally,
) -> list[dict[str, Any]]:
    rps: dict[VariantKey, float] = {}
    holders: dict[VariantKey, list[str]] = {}
    for node in nodes:
        for copy in node["copies"]:
            key = (copy["model"], copy["variant"])
            rps[key] = rps.get(key, 0.0) + copy["rps"]
            holders.setdefault(key, []).append(node["id"])
    names = sorted({model for model, _ in snapshot.models})
    out = []
    for name in names:
        specs = snapshot.variants(name)
        total = sum(rps.get((name, s.variant), 0.0) for s in specs)
        versions: dict[str, list[dict[str, Any]]] = {}
        for spec in specs:
            key = (name, spec.variant)
            placement = snapshot.placements.get(key)
            variant_rps = rps.get(key, 0.0)
            versions.setdefault(version_of(spec), []).append(
                {
                    "variant": spec.variant,
                    "accuracy": spec.accuracy or None,
                    "desired": placement.desired_copies if placement is not None else spec.copies,
                    "ready": snapshot.ready_count(key),
                    "nodes": sorted(holders.get(key, [])),
                    "rps": round(variant_rps, 2),
                    "share": round(variant_rps / total, 3) if total > 0 else 0.0,
                    "failed": dict(placement.failed) if placement is not None else {},
                }
            )
        aliases = []
        for (model, alias_name), alias in sorted(snapshot.aliases.items()):
            if model != name:
                continue
            status = alias_state(snapshot, name, alias, linked)
            aliases.append(
                {
                    "alias": alias_name,
                    "version": alias.version,
                    "serving": status.serving,
                    "canary_version": alias.canary_version,
                    "canary_percent": alias.canary_percent,
                    "canary_active": status.canary_active,
                    "reason": status.reason,
                }
            )
        alarms = [
            {
                "kind": episode.kind,
                "variant": episode.variant,
                "message": episode.message,
                "since_ms": episode.unix_ms,
            }
            for episode in sorted(
                (e for e in episodes.values() if e.model == name),
                key=lambda e: (e.kind, e.variant),
            )
        ]
        out.append(
            {
                "name": name,
                "rps": round(total, 2),
                "versions": [
                    {"version": version, "variants": variants}
                    for version, variants in sorted(versions.items())
                ],
                "aliases": aliases,
                "slo_ms": max((s.slo_ms for s in specs), default=0.0),
                "slo_hit_rate": slo.hit_rate(name),
                "alarms": alarms,
            }
        )
    return out


def mesh_state(
    *,
    snapshot: Snapshot,
    sessions: Mapping[str, Telemetered],
    replica: mesh_pb2.ReplicaInfo,
    replicas: Iterable[mesh_pb2.ReplicaInfo],
    leader: str,
    episodes: Mapping[EpisodeKey, Episode],
    rates: Rates,
    slo: SloTally,
    events_seq: int,
    now_ms: int,
) -> dict[str, Any]:
    """The ``State`` document (see the module contract); feeds ``rates`` the new telemetry."""
    infos = node_list(snapshot, sessions).nodes
    rates.update(info for info in infos if info.node_id in sessions)
    nodes = [_node_doc(info, snapshot, info.node_id in sessions, rates) for info in infos]
    flows = [
        {"node": n["id"], "rps": n["rps"], "path": "tunnel" if n["tunneled"] else "direct"}
        for n in nodes
        if n["rps"] > 0
    ]
    return {
        "time_ms": now_ms,
        "replica": {
            "id": replica.replica_id,
            "address": replica.address,
            "leader": leader == replica.replica_id,
        },
        "replicas": [
            {"id": r.replica_id, "address": r.address, "leader": leader == r.replica_id}
            for r in replicas
        ],
        "leader": leader,
        "nodes": nodes,
        "models": _model_docs(snapshot, nodes, sessions, episodes, slo),
        "flows": flows,
        "events_seq": events_seq,
    }


def event_doc(event: mesh_pb2.Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "time_ms": event.unix_ms,
        "kind": event.kind,
        "model": event.model,
        "variant": event.variant,
        "node": event.node_id,
        "message": event.message,
        "replica": event.replica_id,
    }


def explain_doc(model: str, variant: str, result: mesh_pb2.ExplainPlacementResponse) -> Any:
    return {
        "model": model,
        "variant": variant,
        "result": MessageToDict(
            result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        ),
    }
