"""Memory in a placement pass: what a copy of each variant takes, and what to move off a node
whose copies no longer fit.

Contract: both are pure over the immutable snapshot; :func:`footprints` returns a fresh dict,
:func:`relieve` changes only the pass's working state it is given (the NodeTable and the
nodes each variant is placed on), never the snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from meshserve.controlplane.placement.policies.table import NodeTable
from meshserve.controlplane.snapshot import Snapshot, VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["FACTOR_BOUNDS", "Relief", "footprints", "load_factor", "relieve"]

_READY = mesh_pb2.READY


def footprints(snapshot: Snapshot) -> dict[VariantKey, int]:
    """Memory a copy of each variant takes: the larger of its declared ``size_bytes`` (the
    artifact's size: ``meshctl models register`` fills it in from a local file) and the
    resident memory nodes measured after loading it (real numbers win once known). A variant
    neither declared nor measured yet is estimated at its artifact's size as a node reported it
    while fetching (``bytes_total``) times :func:`load_factor`, never at 0 once anything is
    known."""
    sizes = {key: int(spec.size_bytes) for key, spec in snapshot.models.items()}
    artifact: dict[VariantKey, int] = {}
    for node in snapshot.holders().values():
        for key, status in node.copies.items():
            if key not in sizes:
                continue
            if status.state == mesh_pb2.READY:
                sizes[key] = max(sizes[key], int(status.memory_bytes))
            artifact[key] = max(artifact.get(key, 0), int(status.bytes_total))
    factor = None
    for key, size in artifact.items():
        if sizes[key] == 0 and size > 0:
            factor = load_factor(snapshot) if factor is None else factor
            sizes[key] = int(size * factor)
    return sizes


# Bounds of the measured resident-memory / artifact-bytes factor (a copy's runtime needs at
# least its weights; more than 4x its file is a measurement gone wrong).
FACTOR_BOUNDS = (1.0, 4.0)


def load_factor(snapshot: Snapshot) -> float:
    """How much memory a loaded copy takes per artifact byte on this mesh: the median, over
    READY copies whose node reported both, of measured resident memory / artifact bytes,
    within :data:`FACTOR_BOUNDS`; the lower bound (1) before anything is measured."""
    ratios = sorted(
        status.memory_bytes / status.bytes_total
        for node in snapshot.holders().values()
        for status in node.copies.values()
        if status.state == mesh_pb2.READY and status.bytes_total > 0 and status.memory_bytes > 0
    )
    low, high = FACTOR_BOUNDS
    if not ratios:
        return low
    return min(max(ratios[len(ratios) // 2], low), high)


@dataclass(frozen=True, slots=True)
class Relief:
    """A copy of ``key`` taken off ``node_id``'s placement: the node's placed copies took
    ``used`` bytes of its ``memory`` (re-planned elsewhere by the same pass's top-up)."""

    key: VariantKey
    node_id: str
    used: float
    memory: float

    def message(self) -> str:
        return (
            f"copy on {self.node_id} re-planned: the node's copies measure "
            f"{self.used / 2**20:.1f} MiB of its {self.memory / 2**20:.1f} MiB"
        )


def relieve(
    snapshot: Snapshot,
    table: NodeTable,
    sizes: Mapping[VariantKey, int],
    nodes_of: dict[VariantKey, list[str]],
) -> list[Relief]:
    """Re-plan what no longer fits: on a node whose placed copies now take more than its
    memory (a copy measured bigger than it was estimated), take copies off its placement until
    the rest fits, so the top-up places them elsewhere. Copies not serving yet go first, then
    the biggest; the only copy of a variant that is READY there stays (moving it would leave
    the variant with no serving copy). Returns what it took off, in that order."""
    over = np.flatnonzero((table.memory > 0) & (table.used > table.memory))
    out: list[Relief] = []
    if over.size == 0:
        return out
    on_node: dict[str, list[VariantKey]] = {}
    for key, nodes in nodes_of.items():
        for node_id in nodes:
            on_node.setdefault(node_id, []).append(key)
    for row in (int(r) for r in over):
        node_id = table.ids[row]
        ready = {k for k, st in snapshot.nodes[node_id].copies.items() if st.state == _READY}
        movable = [k for k in on_node.get(node_id, []) if len(nodes_of[k]) > 1 or k not in ready]
        movable.sort(key=lambda k: (k in ready, -sizes[k], k))
        for key in movable:
            if table.used[row] <= table.memory[row]:
                break
            out.append(Relief(key, node_id, float(table.used[row]), float(table.memory[row])))
            nodes_of[key].remove(node_id)
            table.unplace(row, sizes[key])
    return out
