"""Eviction: take off the copies that are cheapest to lose, as few as free enough memory.

A copy's value is (1 + queries in flight on it) x (its measured reload seconds, load plus
warm-up, + ``reload_floor_s``) x its footprint in bytes; a copy the node reports no status for
is assumed to reload in ``unknown_reload_s``. Residents go cheapest first (ties by variant key)
until the missing bytes are freed; more than ``max_victims`` needed, or all of them not enough,
means no fit on this node.
"""

from __future__ import annotations

from meshserve.common.policy.eviction import DEFAULT_EVICTION, CheapestReloadParams
from meshserve.controlplane.placement.policies.plugins import Resident, Shortfall, Victim
from meshserve.controlplane.snapshot import Snapshot


class CheapestReload:
    name = "cheapest_reload"

    def __init__(self, params: CheapestReloadParams = DEFAULT_EVICTION) -> None:
        self.params = params

    def value(self, snapshot: Snapshot, node_id: str, r: Resident) -> float:
        """What keeping ``r`` on ``node_id`` is worth (higher = kept longer)."""
        node = snapshot.nodes.get(node_id)
        status = node.copies.get(r.key) if node is not None else None
        if status is None:
            reload_s = self.params.unknown_reload_s
        else:
            reload_s = status.load_seconds + status.warmup_seconds
        busy = snapshot.in_flight.get(node_id, {}).get(r.key, 0.0)
        return (1.0 + busy) * (reload_s + self.params.reload_floor_s) * max(r.footprint, 1.0)

    def victims(self, q: Shortfall) -> tuple[Victim, ...]:
        node_id = q.table.ids[q.row]
        ranked = sorted(
            ((self.value(q.snapshot, node_id, r), r) for r in q.residents),
            key=lambda pair: (pair[0], pair[1].key),
        )
        limit = self.params.max_victims or len(ranked)
        chosen: list[Victim] = []
        missing = q.missing
        for value, r in ranked:
            if missing <= 0:
                break
            if len(chosen) == limit:
                return ()
            chosen.append(Victim(r.key, value))
            missing -= r.footprint
        return tuple(chosen) if missing <= 0 else ()
