"""Placement: how many copies of every registered variant, and on which nodes.

A pure function of a :class:`Snapshot` and a policy (no I/O, never raises for "no fit"): it
returns the placements to write and the ones to delete. The leader writes them; every replica
acts on them. Per variant, in key order:

1. keep the nodes already placed that are alive, not draining, still match the variant's
   ``node_selector`` (an admin may relabel a node), and whose copy has not FAILED;
2. a copy that FAILED on a node is recorded in ``placement.failed`` (and its record in
   ``placement.failures``): the node is kept out until the record says otherwise — a transient
   failure after a backoff on the ``now_ms`` passed in, a permanent one after a new artifact,
   registration or manual retry (:mod:`meshserve.controlplane.placement.failures`); a copy that
   turns READY drops its record;
3. shed copies beyond the desired count (the busiest go last: the least busy are shed first),
   and re-plan a node whose copies no longer fit once measured
   (:func:`~meshserve.controlplane.placement.memory.relieve`);
4. adopt READY copies nodes already hold but no placement names (a node back from a network
   cut, a control plane that lost its placements): serving copies are never reloaded;
5. top up to the desired count with
:func:`meshserve.controlplane.placement.policies.pipeline.choose` under the
   rule the policy gives the variant (filters: not draining, not failed, node_selector,
   execution providers, anti-affinity, fits memory; weighted scores), at most
   ``max_loads_per_node`` new copies per node per pass;
6. a variant still below its minimum (:func:`min_copies`) only for lack of memory may evict
   copies of variants that stay at or above their own minimum. *Where*: the nodes the rule's
   pipeline ranks best (its filters but ``fits_memory``, its scores), best first. *What*: the
   rule's eviction plugin (``rule.eviction``, built by
   :func:`~meshserve.controlplane.placement.policies.pipeline.eviction_step`; the built-in
   ``cheapest_reload`` takes the cheapest set of copies that frees enough: use x reload cost x
   size) is asked, on each of those nodes, which of the node's evictable copies to take off;
   of the answers that free enough, the one whose victims are worth least in total wins (ties:
   the better-ranked node), so a cheap copy on the second node beats a dear one on the first.
   Evicting only for a minimum, never below one, means two variants can never evict each
   other back and forth.

The desired count is ``copies`` (at least 1), or the autoscaler's decision for variants with
``autoscaling`` (see :mod:`meshserve.controlplane.placement.autoscale`), passed in as ``desired``.
A copy's memory
footprint is the larger of its declared ``size_bytes`` and the resident memory its copies were
measured at: real numbers win once known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from meshserve.common.policy.rule import DEFAULT_RULE, Rule
from meshserve.controlplane.placement import failures as _failures
from meshserve.controlplane.placement.failures import DEFAULT_RETRY, RetryPolicy
from meshserve.controlplane.placement.memory import Relief, footprints, relieve
from meshserve.controlplane.placement.policies.pipeline import (
    Verdict,
    choose,
    eviction_step,
    explain,
    rank,
)
from meshserve.controlplane.placement.policies.plugins import Resident, Shortfall, Victim
from meshserve.controlplane.placement.policies.table import Candidate, NodeTable, TableMemo
from meshserve.controlplane.snapshot import Snapshot, VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["Eviction", "Plan", "RuleSource", "explain_variant", "min_copies", "plan_placements"]


class RuleSource(Protocol):
    def rule_for(self, spec: mesh_pb2.ModelSpec) -> Rule: ...


class _Default:
    def rule_for(self, spec: mesh_pb2.ModelSpec) -> Rule:
        return DEFAULT_RULE


@dataclass(frozen=True, slots=True)
class Eviction:
    key: VariantKey  # the variant whose copy goes
    node_id: str
    for_key: VariantKey  # the variant that needed the room
    value: float  # what the evicted copy was worth, as the eviction plugin values copies


@dataclass(frozen=True, slots=True)
class Plan:
    upserts: dict[VariantKey, mesh_pb2.Placement]
    deletes: list[VariantKey]
    evictions: list[Eviction] = field(default_factory=list)
    relieved: list[Relief] = field(default_factory=list)  # copies re-planned off a full node


def min_copies(spec: mesh_pb2.ModelSpec) -> int:
    """Copies a variant keeps even under memory pressure: ``autoscaling.min_copies`` for
    autoscaled variants, else 1 (copies beyond the first may be evicted for another variant's
    first copy)."""
    return int(spec.autoscaling.min_copies) if spec.HasField("autoscaling") else 1


def plan_placements(
    snapshot: Snapshot,
    policy: RuleSource | None = None,
    *,
    desired: Mapping[VariantKey, int] | None = None,
    now_ms: int = 0,
    retry: RetryPolicy = DEFAULT_RETRY,
    memo: TableMemo | None = None,
) -> Plan:
    """``now_ms``: the leader's clock (ms since the epoch) that failure retries are timed on;
    ``retry``: their backoff; ``memo``: the caller's :class:`TableMemo` across passes (a cache:
    the plan is the same without it)."""
    rules = policy or _Default()
    deletes = [key for key in snapshot.placements if key not in snapshot.models]
    table, sizes = _table(snapshot, memo)
    demand = _Demand(snapshot)
    order = sorted(snapshot.models)
    wants: dict[VariantKey, int] = {}
    nodes_of: dict[VariantKey, list[str]] = {}
    failed_of: dict[VariantKey, dict[str, str]] = {}
    records_of: dict[VariantKey, dict[str, mesh_pb2.CopyFailure]] = {}
    # Pass 1: keep what is alive and healthy, shed what is beyond the desired count.
    for key in order:
        spec = snapshot.models[key]
        want = (desired or {}).get(key, max(1, spec.copies))
        old = snapshot.placements.get(key)
        failed, records_of[key] = _failures.carried(spec, old, now_ms, retry)
        kept = _kept(
            snapshot, table, key, spec, old, sizes[key], failed, records_of[key], now_ms, retry
        )
        if len(kept) > want:  # shed the least busy copies first
            kept.sort(key=lambda n: -_busy(snapshot, n, key))
            for node_id in kept[want:]:
                table.unplace(table.index[node_id], sizes[key])
            kept = kept[:want]
        wants[key], nodes_of[key], failed_of[key] = want, kept, failed
    relieved = relieve(snapshot, table, sizes, nodes_of)
    # Pass 2: adopt copies nodes already hold (a node back from a network cut keeps serving what
    # it loaded: no reload, nothing dropped), then top up through the pipeline; a variant below
    # its minimum may evict cheaper copies.
    evictions: list[Eviction] = []
    for key in order:
        spec = snapshot.models[key]
        kept = nodes_of[key]
        for node in snapshot.ready_nodes(key):
            if len(kept) >= wants[key]:
                break
            node_id = node.node_id
            row = table.index[node_id]
            fits = table.memory[row] == 0 or table.memory[row] - table.used[row] >= sizes[key]
            if (
                fits
                and node_id not in kept
                and node_id not in failed_of[key]
                and node_id not in snapshot.draining
                and node.copies[key].sha256 == spec.sha256.lower()
                and node.matches(spec.node_selector)
            ):
                kept.append(node_id)
                table.place(row, sizes[key], new=False)
        if len(kept) >= wants[key]:
            continue
        rule = rules.rule_for(spec)
        candidate = _candidate(table, key, spec, rule, kept, failed_of[key], sizes[key], demand)
        candidate = dataclasses.replace(
            candidate, failed_reasons=_failed_reasons(table, key, failed_of[key], records_of[key])
        )
        for row in choose(table, candidate, wants[key] - len(kept)):
            kept.append(table.ids[row])
            table.place(row, sizes[key], new=True)
        if len(kept) < min(wants[key], min_copies(spec)) and sizes[key] > 0:
            evictions += _evict_for(snapshot, table, sizes, nodes_of, candidate, rule)
    upserts: dict[VariantKey, mesh_pb2.Placement] = {}
    for key in order:
        new = mesh_pb2.Placement(
            model=key[0],
            variant=key[1],
            nodes=nodes_of[key],
            failed=failed_of[key],
            desired_copies=wants[key],
            failures=records_of[key],
        )
        old = snapshot.placements.get(key)
        if old is None or old != new:
            upserts[key] = new
    return Plan(upserts, deletes, evictions, relieved)


# Nodes the eviction step is asked about, best-ranked first, before the variant stays short.
_EVICTION_NODES = 16


def _evict_for(
    snapshot: Snapshot,
    table: NodeTable,
    sizes: Mapping[VariantKey, int],
    nodes_of: dict[VariantKey, list[str]],
    c: Candidate,
    rule: Rule,
) -> list[Eviction]:
    """Make room for one copy of ``c``: ask the rule's eviction plugin, on the best-ranked
    nodes first, which copies of variants that stay at or above their minimum to evict."""
    step = eviction_step(rule.eviction)
    relaxed = dataclasses.replace(
        rule, filters=tuple(f for f in rule.filters if f != "fits_memory")
    )
    c = dataclasses.replace(c, rule=relaxed, holders=table.rows(nodes_of[c.key]))
    on_node: dict[str, list[VariantKey]] = {}
    for key, nodes in nodes_of.items():
        for node_id in nodes:
            on_node.setdefault(node_id, []).append(key)
    best: tuple[float, int, tuple[Victim, ...]] | None = None
    for row in rank(table, c, _EVICTION_NODES):
        node_id = table.ids[row]
        if table.memory[row] <= 0:
            continue
        missing = c.footprint - (table.memory[row] - table.used[row])
        victims: tuple[Victim, ...] = ()
        if missing > 0:
            residents = tuple(
                Resident(key, float(sizes[key]))
                for key in sorted(on_node.get(node_id, []))
                if key != c.key and len(nodes_of[key]) > min_copies(snapshot.models[key])
            )
            if sum(r.footprint for r in residents) < missing:
                continue  # no answer could free enough here
            victims = step.victims(Shortfall(snapshot, table, c, row, missing, residents))
            if not _frees(victims, residents, missing):
                continue
        cost = sum(v.value for v in victims)
        if best is None or cost < best[0]:  # ties: the better-ranked node (asked first)
            best = (cost, row, victims)
        if cost <= 0:
            break  # nothing to evict: nothing cheaper can come
    if best is None:
        return []
    _, row, victims = best
    node_id = table.ids[row]
    out = []
    for victim in victims:
        nodes_of[victim.key].remove(node_id)
        table.unplace(row, sizes[victim.key])
        out.append(Eviction(victim.key, node_id, c.key, victim.value))
    nodes_of[c.key].append(node_id)
    table.place(row, c.footprint, new=True)
    return out


def _frees(victims: tuple[Victim, ...], residents: tuple[Resident, ...], missing: float) -> bool:
    """The plugin's answer names distinct residents that free at least ``missing`` bytes."""
    sizes = {r.key: r.footprint for r in residents}
    keys = [v.key for v in victims]
    if not keys or len(set(keys)) < len(keys) or any(k not in sizes for k in keys):
        return False
    return sum(sizes[k] for k in keys) >= missing


def explain_variant(
    snapshot: Snapshot, key: VariantKey, policy: RuleSource | None = None
) -> tuple[Rule, int, list[str], list[Verdict]]:
    """(rule, desired copies, placed nodes, every node's verdict) for ``key`` on the current
    view: the placed nodes are holders ("holds a copy"); only the nodes chosen for the missing
    copies are selected besides them (none when no copy is missing: the others keep their
    scores, so the answer still says where one more copy would go)."""
    spec = snapshot.models[key]
    rule = (policy or _Default()).rule_for(spec)
    table, sizes = _table(snapshot)
    placement = snapshot.placements.get(key)
    placed = [n for n in (placement.nodes if placement else []) if n in table.index]
    failed = dict(placement.failed) if placement else {}
    if placement is not None and (placement.desired_copies or spec.HasField("autoscaling")):
        want = int(placement.desired_copies)  # 0: scaled to zero
    else:
        want = max(1, spec.copies)
    candidate = _candidate(table, key, spec, rule, placed, failed, sizes[key], _Demand(snapshot))
    records = dict(placement.failures) if placement else {}
    candidate = dataclasses.replace(
        candidate, failed_reasons=_failed_reasons(table, key, failed, records)
    )
    verdicts = explain(table, candidate, want - len(placed))
    return rule, want, placed, verdicts


def _table(
    snapshot: Snapshot, memo: TableMemo | None = None
) -> tuple[NodeTable, dict[VariantKey, int]]:
    in_flight = {n: float(sum(v.values())) for n, v in snapshot.in_flight.items()}
    table = NodeTable.build(snapshot, draining=snapshot.draining, in_flight=in_flight, memo=memo)
    sizes = footprints(snapshot)
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
    failed: dict[str, str],
    records: dict[str, mesh_pb2.CopyFailure],
    now_ms: int,
    retry: RetryPolicy,
) -> list[str]:
    """The placed nodes that keep their copy; a copy that FAILED (for this artifact) adds its
    node to ``failed`` and its record to ``records``; a READY copy drops its node's record."""
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
            records[node_id] = _failures.record_failure(
                spec, node_id, status, records.get(node_id), now_ms, retry
            )
            table.unplace(table.index[node_id], size)
        elif node_id in snapshot.draining or not node.matches(spec.node_selector):
            table.unplace(table.index[node_id], size)  # an admin moved it (or its labels) away
        else:
            kept.append(node_id)
            if status is not None and status.state == mesh_pb2.READY:
                records.pop(node_id, None)
    return kept


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


def _failed_reasons(
    table: NodeTable,
    key: VariantKey,
    failed: Mapping[str, str],
    records: Mapping[str, mesh_pb2.CopyFailure],
) -> dict[int, str]:
    """row -> what ``explain`` says of a node kept out by a failure (and when it is retried)."""
    return {
        table.index[n]: _failures.describe(key[0], n, reason, records.get(n))
        for n, reason in failed.items()
        if n in table.index
    }


def _busy(snapshot: Snapshot, node_id: str, key: VariantKey) -> float:
    return snapshot.in_flight.get(node_id, {}).get(key, 0.0)
