"""The first placement policy: keep ``copies`` healthy copies of every registered variant.

A pure function of a :class:`Snapshot` (no I/O, never raises for "no fit"): it returns the
placements to write and the ones to delete. The leader writes them; every replica acts on them.

Rules, in order, per variant:
1. keep nodes already placed that are alive and whose copy has not FAILED;
2. a copy that FAILED on a node is recorded in ``placement.failed`` and never retried there;
3. top up to ``copies`` with the alive nodes that match the model's ``node_selector``, offer
   every execution provider the variant requires, have room (the variant's footprint — declared
   ``size_bytes`` or the resident memory its copies were measured at, whichever is larger —
   against the node's memory minus what is already placed there), and are not recorded as
   failed — fewest placed copies first, then most free memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controlplane.snapshot import NodeView, Snapshot, VariantKey
from protos import mesh_pb2

__all__ = ["Plan", "plan_placements"]


@dataclass(frozen=True, slots=True)
class Plan:
    upserts: dict[VariantKey, mesh_pb2.Placement]
    deletes: list[VariantKey]


def plan_placements(snapshot: Snapshot) -> Plan:
    upserts: dict[VariantKey, mesh_pb2.Placement] = {}
    deletes = [key for key in snapshot.placements if key not in snapshot.models]
    load: dict[str, int] = {n: 0 for n in snapshot.nodes}
    used_bytes: dict[str, int] = {n: 0 for n in snapshot.nodes}
    sizes = _footprints(snapshot)
    for key, placement in snapshot.placements.items():
        for node_id in placement.nodes:
            if node_id in load:
                load[node_id] += 1
                used_bytes[node_id] += sizes.get(key, 0)

    for key in sorted(snapshot.models):
        spec = snapshot.models[key]
        old = snapshot.placements.get(key)
        desired = max(1, spec.copies)
        failed = dict(old.failed) if old is not None else {}
        kept: list[str] = []
        for node_id in old.nodes if old is not None else []:
            node = snapshot.nodes.get(node_id)
            if node is None:
                continue
            status = node.copies.get(key)
            if (
                status is not None
                and status.state == mesh_pb2.FAILED
                and (not status.sha256 or status.sha256 == spec.sha256.lower())
            ):
                failed[node_id] = status.reason or "copy failed"
                load[node_id] -= 1
                used_bytes[node_id] -= sizes[key]
                continue
            kept.append(node_id)
        for node_id in kept[desired:]:  # copies lowered: shed the most loaded placements
            load[node_id] -= 1
            used_bytes[node_id] -= sizes[key]
        kept = kept[:desired]
        candidates = [
            n
            for n in snapshot.nodes.values()
            if n.node_id not in kept
            and n.node_id not in failed
            and n.matches(spec.node_selector)
            and _has_providers(n, spec.execution_providers)
            and _fits(n, sizes[key], used_bytes)
        ]
        candidates.sort(key=lambda n: (load[n.node_id], -_free(n, used_bytes), n.node_id))
        for node in candidates[: desired - len(kept)]:
            kept.append(node.node_id)
            load[node.node_id] += 1
            used_bytes[node.node_id] += sizes[key]
        new = mesh_pb2.Placement(
            model=key[0], variant=key[1], nodes=kept, failed=failed, desired_copies=desired
        )
        if old is None or old != new:
            upserts[key] = new
    return Plan(upserts, deletes)


def _footprints(snapshot: Snapshot) -> dict[VariantKey, int]:
    """Memory a copy of each variant takes: the larger of its declared ``size_bytes`` and the
    resident memory nodes measured after loading it (real numbers win once known)."""
    sizes = {key: int(spec.size_bytes) for key, spec in snapshot.models.items()}
    for node in snapshot.nodes.values():
        for key, status in node.copies.items():
            if key in sizes and status.state == mesh_pb2.READY:
                sizes[key] = max(sizes[key], int(status.memory_bytes))
    return sizes


def _has_providers(node: NodeView, required: Sequence[str]) -> bool:
    return set(required) <= set(node.hardware.execution_providers)


def _free(node: NodeView, used: dict[str, int]) -> int:
    return int(node.hardware.memory_bytes) - used.get(node.node_id, 0)


def _fits(node: NodeView, size: int, used: dict[str, int]) -> bool:
    return size == 0 or node.hardware.memory_bytes == 0 or _free(node, used) >= size
