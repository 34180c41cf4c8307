"""Placement: how many copies of every registered variant, and on which nodes.

A pure function of a :class:`Snapshot` and a policy (no I/O, never raises for "no fit"): it
returns the placements to write and the ones to delete. The leader writes them; every replica
acts on them. Per variant, in key order:

1. keep the nodes already placed that are alive, not draining, and whose copy has not FAILED;
2. a copy that FAILED on a node is recorded in ``placement.failed`` and never retried there;
3. shed copies beyond the desired count (the busiest go last: the least busy are shed first);
4. top up to the desired count with :func:`controlplane.policies.pipeline.choose` under the
   rule the policy gives the variant (filters: not draining, not failed, node_selector,
   execution providers, anti-affinity, fits memory; weighted scores), at most
   ``max_loads_per_node`` new copies per node per pass.

The desired count is ``copies`` (at least 1), or the autoscaler's decision for variants with
``autoscaling`` (see :mod:`controlplane.autoscale`), passed in as ``desired``. A copy's memory
footprint is the larger of its declared ``size_bytes`` and the resident memory its copies were
measured at: real numbers win once known.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from controlplane.policies.pipeline import Verdict, choose, explain
from controlplane.policies.rule import DEFAULT_RULE, Rule
from controlplane.policies.table import Candidate, NodeTable
from controlplane.snapshot import Snapshot, VariantKey
from protos import mesh_pb2

__all__ = ["Plan", "RuleSource", "explain_variant", "plan_placements"]


class RuleSource(Protocol):
    def rule_for(self, spec: mesh_pb2.ModelSpec) -> Rule: ...


class _Default:
    def rule_for(self, spec: mesh_pb2.ModelSpec) -> Rule:
        return DEFAULT_RULE


@dataclass(frozen=True, slots=True)
class Plan:
    upserts: dict[VariantKey, mesh_pb2.Placement]
    deletes: list[VariantKey]


def plan_placements(
    snapshot: Snapshot,
    policy: RuleSource | None = None,
    *,
    desired: Mapping[VariantKey, int] | None = None,
) -> Plan:
    rules = policy or _Default()
    deletes = [key for key in snapshot.placements if key not in snapshot.models]
    table, sizes = _table(snapshot)
    demand = _Demand(snapshot)
    upserts: dict[VariantKey, mesh_pb2.Placement] = {}
    for key in sorted(snapshot.models):
        spec = snapshot.models[key]
        old = snapshot.placements.get(key)
        want = (desired or {}).get(key, max(1, spec.copies))
        kept, failed = _kept(snapshot, table, key, spec, old, sizes[key])
        if len(kept) > want:  # shed the least busy copies first
            kept.sort(key=lambda n: -_busy(snapshot, n, key))
            for node_id in kept[want:]:
                table.unplace(table.index[node_id], sizes[key])
            kept = kept[:want]
        rule = rules.rule_for(spec)
        candidate = _candidate(table, key, spec, rule, kept, failed, sizes[key], demand)
        for row in choose(table, candidate, want - len(kept)):
            kept.append(table.ids[row])
            table.place(row, sizes[key], new=True)
        new = mesh_pb2.Placement(
            model=key[0], variant=key[1], nodes=kept, failed=failed, desired_copies=want
        )
        if old is None or old != new:
            upserts[key] = new
    return Plan(upserts, deletes)


def explain_variant(
    snapshot: Snapshot, key: VariantKey, policy: RuleSource | None = None
) -> tuple[Rule, int, list[str], list[Verdict]]:
    """(rule, desired copies, placed nodes, every node's verdict) for ``key`` on the current
    view: the placed nodes are holders; the verdicts are for placing the missing copies (or,
    when none is missing, one more)."""
    spec = snapshot.models[key]
    rule = (policy or _Default()).rule_for(spec)
    table, sizes = _table(snapshot)
    placement = snapshot.placements.get(key)
    placed = [n for n in (placement.nodes if placement else []) if n in table.index]
    failed = dict(placement.failed) if placement else {}
    want = placement.desired_copies if placement and placement.desired_copies else spec.copies
    candidate = _candidate(table, key, spec, rule, placed, failed, sizes[key], _Demand(snapshot))
    verdicts = explain(table, candidate, max(1, want - len(placed)))
    return rule, max(1, want), placed, verdicts


def _table(snapshot: Snapshot) -> tuple[NodeTable, dict[VariantKey, int]]:
    in_flight = {n: float(sum(v.values())) for n, v in snapshot.in_flight.items()}
    table = NodeTable.build(snapshot, draining=snapshot.draining, in_flight=in_flight)
    sizes = _footprints(snapshot)
    for key, placement in snapshot.placements.items():
        for node_id in placement.nodes:
            row = table.index.get(node_id)
            if row is not None:
                table.place(row, sizes.get(key, 0), new=False)
    return table, sizes


def _kept(
    snapshot: Snapshot,
    table: NodeTable,
    key: VariantKey,
    spec: mesh_pb2.ModelSpec,
    old: mesh_pb2.Placement | None,
    size: int,
) -> tuple[list[str], dict[str, str]]:
    failed = dict(old.failed) if old is not None else {}
    kept: list[str] = []
    for node_id in old.nodes if old is not None else []:
        node = snapshot.nodes.get(node_id)
        if node is None:
            continue  # gone: its placement accounting was never added
        status = node.copies.get(key)
        if (
            status is not None
            and status.state == mesh_pb2.FAILED
            and (not status.sha256 or status.sha256 == spec.sha256.lower())
        ):
            failed[node_id] = status.reason or "copy failed"
            table.unplace(table.index[node_id], size)
        elif node_id in snapshot.draining:
            table.unplace(table.index[node_id], size)
        else:
            kept.append(node_id)
    return kept, failed


class _Demand:
    """Where each variant's demand is, per domain label value; indexed once per label."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._by_label: dict[str, dict[VariantKey, dict[str, float]]] = {}

    def domains(self, label: str, key: VariantKey) -> dict[str, float]:
        if not label:
            return {}
        index = self._by_label.get(label)
        if index is None:
            index = self._by_label[label] = {}
            for node_id, flights in self._snapshot.in_flight.items():
                node = self._snapshot.nodes.get(node_id)
                if node is None:
                    continue
                domain = node.labels.get(label, "")
                for variant, count in flights.items():
                    per = index.setdefault(variant, {})
                    per[domain] = per.get(domain, 0.0) + count
        return index.get(key, {})


def _candidate(
    table: NodeTable,
    key: VariantKey,
    spec: mesh_pb2.ModelSpec,
    rule: Rule,
    holders: list[str],
    failed: Mapping[str, str],
    footprint: int,
    demand: _Demand,
) -> Candidate:
    return Candidate(
        key=key,
        spec=spec,
        rule=rule,
        footprint=float(footprint),
        holders=table.rows(holders),
        failed=table.rows(failed),
        demand_domains=demand.domains(rule.spread_by, key),
    )


def _busy(snapshot: Snapshot, node_id: str, key: VariantKey) -> float:
    return snapshot.in_flight.get(node_id, {}).get(key, 0.0)


def _footprints(snapshot: Snapshot) -> dict[VariantKey, int]:
    """Memory a copy of each variant takes: the larger of its declared ``size_bytes`` and the
    resident memory nodes measured after loading it (real numbers win once known)."""
    sizes = {key: int(spec.size_bytes) for key, spec in snapshot.models.items()}
    for node in snapshot.nodes.values():
        for key, status in node.copies.items():
            if key in sizes and status.state == mesh_pb2.READY:
                sizes[key] = max(sizes[key], int(status.memory_bytes))
    return sizes
