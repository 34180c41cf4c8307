"""Tiny builders for the pure placement tests: a NodeTable from nodes, a Candidate for it, and
the question an eviction plugin answers (no etcd, no network)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshserve.common.policy.rule import DEFAULT_RULE, Rule
from meshserve.controlplane.placement.policies.plugins import Resident, Shortfall
from meshserve.controlplane.placement.policies.table import Candidate, NodeTable
from meshserve.controlplane.snapshot import NodeView, Snapshot, VariantKey
from meshserve.protos import mesh_pb2
from tests.support.views import GiB, node

__all__ = ["KEY", "Copy", "Given", "cand", "shortfall", "table_of"]

KEY: VariantKey = ("m", "default")


def table_of(
    *nodes: NodeView,
    draining: tuple[str, ...] = (),
    placed: Mapping[str, tuple[float, ...]] | None = None,
    loads: Mapping[str, int] | None = None,
    in_flight: Mapping[str, float] | None = None,
) -> NodeTable:
    """A table of ``nodes``; ``placed``: footprints of copies already on a node (kept);
    ``loads``: new copies already given to a node this pass."""
    snap = Snapshot(nodes=MappingProxyType({n.node_id: n for n in nodes}))
    table = NodeTable.build(snap, draining=draining, in_flight=in_flight)
    for node_id, footprints in (placed or {}).items():
        for footprint in footprints:
            table.place(table.index[node_id], footprint, new=False)
    for node_id, count in (loads or {}).items():
        for _ in range(count):
            table.place(table.index[node_id], 0, new=True)
    return table


def cand(
    table: NodeTable,
    *,
    rule: Rule | None = None,
    footprint: float = 0.0,
    holders: tuple[str, ...] = (),
    failed: tuple[str, ...] = (),
    selector: Mapping[str, str] | None = None,
    providers: tuple[str, ...] = (),
    demand: Mapping[str, float] | None = None,
) -> Candidate:
    spec = mesh_pb2.ModelSpec(
        name=KEY[0],
        variant=KEY[1],
        node_selector=dict(selector or {}),
        execution_providers=providers,
    )
    return Candidate(
        key=KEY,
        spec=spec,
        rule=rule or Rule(),
        footprint=footprint,
        holders=table.rows(holders),
        failed=table.rows(failed),
        demand_domains=dict(demand or {}),
    )


@dataclass(frozen=True)
class Given:
    """A table and a candidate, as one row of a plugin's table of cases."""

    nodes: tuple[NodeView, ...]
    draining: tuple[str, ...] = ()
    placed: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    in_flight: Mapping[str, float] = field(default_factory=dict)
    rule: Rule = DEFAULT_RULE
    footprint: float = 0.0
    holders: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    selector: Mapping[str, str] = field(default_factory=dict)
    providers: tuple[str, ...] = ()
    demand: Mapping[str, float] = field(default_factory=dict)

    def build(self) -> tuple[NodeTable, Candidate]:
        table = table_of(
            *self.nodes, draining=self.draining, placed=self.placed, in_flight=self.in_flight
        )
        c = cand(
            table,
            rule=self.rule,
            footprint=self.footprint,
            holders=self.holders,
            failed=self.failed,
            selector=self.selector,
            providers=self.providers,
            demand=self.demand,
        )
        return table, c


@dataclass(frozen=True)
class Copy:
    """A copy of model ``name`` (variant ``default``) on the node an eviction question is
    about. ``load_s`` None: the node reports no status for it (never measured)."""

    name: str
    gib: float
    load_s: float | None = 1.0
    warmup_s: float = 0.0
    in_flight: float = 0.0

    @property
    def key(self) -> VariantKey:
        return (self.name, "default")


def shortfall(copies: tuple[Copy, ...], missing_gib: float, host: str = "host") -> Shortfall:
    """The question "free ``missing_gib`` on ``host`` for a copy of KEY", where every copy in
    ``copies`` is on ``host`` and may go."""
    statuses = {
        c.key: mesh_pb2.CopyStatus(
            model=c.name,
            variant="default",
            state=mesh_pb2.READY,
            load_seconds=c.load_s,
            warmup_seconds=c.warmup_s,
        )
        for c in copies
        if c.load_s is not None
    }
    base = node(host, memory=64 * GiB)
    view = NodeView(
        base.node_id,
        base.labels,
        base.hardware,
        "",
        base.replicas,
        MappingProxyType(statuses),
    )
    snapshot = Snapshot(
        nodes=MappingProxyType({host: view}),
        in_flight=MappingProxyType({host: MappingProxyType({c.key: c.in_flight for c in copies})}),
    )
    table = NodeTable.build(snapshot)
    residents = tuple(Resident(c.key, c.gib * GiB) for c in sorted(copies, key=lambda c: c.key))
    return Shortfall(snapshot, table, cand(table), 0, missing_gib * GiB, residents)
