"""What changed between two snapshots, and which linked nodes' reconcile it concerns (pure).

Contract:

- :func:`changes` compares the snapshot the hub last reconciled with a new one, key by key
  (identity first, equality only when identity differs: the snapshot builder keeps a decoded
  value's object while its bytes do not change), and returns a :class:`Changes`. It reads both
  snapshots and nothing else; no I/O, no clock.
- :func:`concerned` turns a :class:`Changes` into the node ids whose
  :func:`~meshserve.controlplane.link.reconcile.reconcile` may decide differently on the new
  snapshot than on the old one. The hub reconciles those (plus the nodes it owes a decision:
  see :class:`~meshserve.controlplane.link.scope.ReconcileScope`); every other node would decide
  exactly what it decided last time. That holds because ``reconcile(snapshot, node, ...)`` reads
  of the snapshot only:

  * the placements that name the node (:func:`~meshserve.controlplane.link.reconcile.placed_on`)
    and their specs -> the nodes named by a changed variant's placement, before or after;
  * the placement (nodes, desired copies, revision) of every variant the node holds -> the
    nodes holding a changed variant (``holders``: the hub's index of what each node holds);
  * for a draining node's READY copy (make before break,
    :func:`~meshserve.controlplane.link.reconcile.awaits_replacement`): the draining marks of
    the nodes its placement names and which nodes hold that variant READY -> every draining
    holder of a variant whose READY copies changed, or whose placement names a node whose
    draining mark changed; and the node's own draining mark -> that node.

  Nodes whose own view (record, labels) changed are included too: cheap, and a node's record
  changes when it reported, which reconciles it anyway.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from itertools import compress
from operator import is_not
from typing import TypeVar

from meshserve.controlplane.link.reconcile import placed_on
from meshserve.controlplane.snapshot import NodeView, Snapshot, VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["NO_CHANGES", "Changes", "changes", "concerned"]

_K = TypeVar("_K")


@dataclass(frozen=True, slots=True)
class Changes:
    """What differs between two snapshots, as far as reconcile reads them."""

    variants: frozenset[VariantKey]  # placement (nodes, desired copies, revision) or spec
    placed: frozenset[str]  # nodes a changed variant's placement names, before or after
    nodes: frozenset[str]  # nodes whose view changed, appeared or went
    draining: frozenset[str]  # nodes whose draining mark came or went
    ready: frozenset[VariantKey]  # variants some node's copy became or stopped being READY of

    def __bool__(self) -> bool:
        return bool(self.variants or self.nodes or self.draining)


NO_CHANGES = Changes(frozenset(), frozenset(), frozenset(), frozenset(), frozenset())


def changes(old: Snapshot, new: Snapshot) -> Changes:
    """What changed from ``old`` to ``new`` (see the module contract)."""
    if old is new:
        return NO_CHANGES
    variants = (
        _changed_keys(old.placements, new.placements)
        | _changed_keys(old.models, new.models)
        | _changed_keys(old.placement_revisions, new.placement_revisions)
    )
    placed: set[str] = set()
    for key in variants:
        for view in (old, new):
            placement = view.placements.get(key)
            if placement is not None:
                placed.update(placement.nodes)
    nodes = _changed_keys(old.nodes, new.nodes)
    ready: set[VariantKey] = set()
    for node_id in nodes:
        ready.update(_ready(old.nodes.get(node_id)) ^ _ready(new.nodes.get(node_id)))
    return Changes(
        variants=frozenset(variants),
        placed=frozenset(placed),
        nodes=frozenset(nodes),
        draining=old.draining ^ new.draining,
        ready=frozenset(ready),
    )


def concerned(
    change: Changes,
    old: Snapshot,
    new: Snapshot,
    holders: Mapping[VariantKey, Collection[str]],
) -> set[str]:
    """The nodes whose reconcile ``change`` (from ``old`` to ``new``) may alter; ``holders``:
    the nodes holding each variant as the hub last reconciled them (see the module contract).
    May name nodes not linked here; the caller keeps those it holds."""
    out: set[str] = set(change.placed)
    out.update(change.nodes)
    out.update(change.draining)
    for key in change.variants:
        out.update(holders.get(key, ()))
    if not new.draining:
        return out
    # make before break: a draining node's READY copy waits on the other nodes of its placement
    watched = set(change.ready)
    for node_id in change.draining:
        watched.update(placed_on(old, node_id))
        watched.update(placed_on(new, node_id))
    for key in watched:
        out.update(n for n in holders.get(key, ()) if n in new.draining)
    return out


def _changed_keys(old: Mapping[_K, object], new: Mapping[_K, object]) -> set[_K]:
    """Keys added, removed, or whose value is another object that is not equal."""
    names = list(new)
    if names == list(old):  # the same keys in the same order (usual): compared in C
        others = compress(names, map(is_not, old.values(), new.values()))
        return {k for k in others if old[k] != new[k]}
    out = {k for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key, _ABSENT)
        if before is not value and before != value:
            out.add(key)
    return out


def _ready(view: NodeView | None) -> set[VariantKey]:
    if view is None:
        return set()
    return {key for key, copy in view.copies.items() if copy.state == mesh_pb2.READY}


_ABSENT = object()
