"""The immutable view of the mesh every router and policy reads (pure; no I/O).

A :class:`Snapshot` is built by the control plane from its etcd mirrors
(:class:`meshserve.controlplane.snapshot.SnapshotBuilder`) and by a router outside it (the SDK,
a standalone gateway) from the routing feed (:mod:`meshserve.common.routing.feed`). Policies and
the routing core are functions of it; fields a feed does not carry keep their empty defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshserve.protos import mesh_pb2

__all__ = ["HOLDERS", "NodeView", "Snapshot", "VariantKey"]

VariantKey = tuple[str, str]  # (model, variant)
T = TypeVar("T")

HOLDERS = "holders"  # the derived index of Snapshot.holders


@dataclass(frozen=True, slots=True)
class NodeView:
    node_id: str
    labels: Mapping[str, str]
    hardware: mesh_pb2.Hardware
    direct_address: str
    replicas: frozenset[str]
    copies: Mapping[VariantKey, mesh_pb2.CopyStatus]

    def state(self, key: VariantKey) -> int:
        status = self.copies.get(key)
        return status.state if status is not None else mesh_pb2.COPY_STATE_UNSPECIFIED

    def matches(self, selector: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True)
class Snapshot:
    models: Mapping[VariantKey, mesh_pb2.ModelSpec] = field(default_factory=dict)
    placements: Mapping[VariantKey, mesh_pb2.Placement] = field(default_factory=dict)
    nodes: Mapping[str, NodeView] = field(default_factory=dict)
    # etcd mod_revision of each placement, and the revision the placements view has reached:
    # the "placement_revision" stamped on Load/Unload commands (see mesh.proto LoadModel).
    placement_revisions: Mapping[VariantKey, int] = field(default_factory=dict)
    placements_revision: int = 0
    draining: frozenset[str] = frozenset()  # nodes an operator is draining
    wake: frozenset[VariantKey] = frozenset()  # scaled-to-zero variants a query is waiting for
    # Live demand: queries in flight per node and variant (telemetry the leader holds). Not part
    # of the etcd view; the leader attaches it per pass with dataclasses.replace.
    in_flight: Mapping[str, Mapping[VariantKey, float]] = field(default_factory=dict)
    # Aliases by (model, alias name): a name that points at a version (see
    # meshserve.common.routing.rollout).
    aliases: Mapping[tuple[str, str], mesh_pb2.Alias] = field(default_factory=dict)
    # Embedded members (applications running models in-process, Hello.kind "embedded"): listed
    # and monitored, never in ``nodes``, so no placement, routing or feed ever sees them.
    members: Mapping[str, NodeView] = field(default_factory=dict)
    # Derived indexes, built on first use (a query must not scan every model and node).
    _index: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def placement_revision(self, key: VariantKey) -> int:
        """The revision a decision about ``key`` is based on: the placement's own
        mod_revision, or, with no placement in view, how far the view has seen."""
        return self.placement_revisions.get(key, self.placements_revision)

    def with_in_flight(self, in_flight: Mapping[str, Mapping[VariantKey, float]]) -> Snapshot:
        """This view with the live demand attached (the leader, per pass). It shares this
        snapshot's derived indexes: none of them reads ``in_flight``."""
        out = dataclasses.replace(self, in_flight=in_flight)
        object.__setattr__(out, "_index", self._index)
        return out

    def holders(self) -> Mapping[str, NodeView]:
        """The nodes that hold at least one copy (any state), by node id: what a pass over
        copies reads instead of every node (most of 10,000 nodes hold nothing). Derived once
        per snapshot; the snapshot builder seeds it from its own incremental index."""
        return self.derived(HOLDERS, lambda: {n: v for n, v in self.nodes.items() if v.copies})

    def derived(self, key: str, build: Callable[[], T]) -> T:
        """``build()``, computed once per snapshot under ``key`` (for pure views of it that a
        query would otherwise rebuild: the result is shared, so callers must not mutate it).
        A derived view must not read ``in_flight`` (see :meth:`with_in_flight`)."""
        if key not in self._index:
            self._index[key] = build()
        value: T = self._index[key]
        return value

    def variants(self, model: str) -> list[mesh_pb2.ModelSpec]:
        by_model: dict[str, list[mesh_pb2.ModelSpec]] | None = self._index.get("variants")
        if by_model is None:
            by_model = {}
            for (name, _), spec in self.models.items():
                by_model.setdefault(name, []).append(spec)
            self._index["variants"] = by_model
        return list(by_model.get(model, ()))

    def ready_nodes(self, key: VariantKey) -> list[NodeView]:
        """Nodes holding a READY copy of ``key``, in node-id order."""
        return list(self._ready().get(key, ()))

    def ready_count(self, key: VariantKey) -> int:
        """How many nodes hold a READY copy of ``key`` (no list built: the query path)."""
        return len(self._ready().get(key, ()))

    def _ready(self) -> dict[VariantKey, list[NodeView]]:
        ready: dict[VariantKey, list[NodeView]] | None = self._index.get("ready")
        if ready is None:
            ready = {}
            holders = self.holders()
            for node_id in sorted(holders):
                node = holders[node_id]
                for variant, status in node.copies.items():
                    if status.state == mesh_pb2.READY:
                        ready.setdefault(variant, []).append(node)
            self._index["ready"] = ready
        return ready
