"""Eviction: take off the set of copies cheapest to lose that frees enough memory.

A copy's value is (1 + queries in flight on it) x (its measured reload seconds, load plus
warm-up, + ``reload_floor_s``) x its footprint in bytes; a copy the node reports no status for
is assumed to reload in ``unknown_reload_s``. The answer is the set of residents, at most
``max_victims`` of them, that frees at least the missing bytes at the least total value (ties:
fewer copies, then variant keys): when one 200 MB copy frees enough, an 80 MB copy is not taken
with it. No such set (all of them not enough, or more than ``max_victims`` needed) means no fit
on this node. The search is exact for up to :data:`EXACT_UP_TO` residents (a branch and bound
over the residents cheapest first); beyond, it takes the cheapest first until enough is freed
and keeps that only if no single resident that frees enough alone is cheaper. Victims are named
cheapest first.
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
        limit = min(self.params.max_victims or len(ranked), len(ranked))
        if len(ranked) <= EXACT_UP_TO:
            best = _cheapest_cover(ranked, q.missing, limit)
        else:
            best = _greedy_cover(ranked, q.missing, limit)
        return tuple(Victim(ranked[i][1].key, ranked[i][0]) for i in best)


# Residents up to which the cheapest sufficient set is searched exactly.
EXACT_UP_TO = 16


def _cheapest_cover(
    ranked: list[tuple[float, Resident]], missing: float, limit: int
) -> tuple[int, ...]:
    """Positions in ``ranked`` (value order) of the least-valued set of at most ``limit``
    residents freeing ``missing`` bytes; ``()`` when none does. Branch and bound: a branch is
    cut once its value reaches the best found, or when all that remains cannot free enough."""
    n = len(ranked)
    suffix = [0.0] * (n + 1)  # bytes all residents from position i on free together
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + ranked[i][1].footprint
    best: tuple[float, int, tuple[int, ...]] | None = None

    def walk(start: int, chosen: tuple[int, ...], value: float, left: float) -> None:
        nonlocal best
        if left <= 0:
            if best is None or (value, len(chosen)) < best[:2]:
                best = (value, len(chosen), chosen)
            return
        if len(chosen) == limit:
            return
        for i in range(start, n):
            if suffix[i] < left:
                return  # the rest together free too little
            worth = value + ranked[i][0]
            if best is not None and worth > best[0]:
                return  # value order: every later branch costs more still
            walk(i + 1, (*chosen, i), worth, left - ranked[i][1].footprint)

    walk(0, (), 0.0, missing)
    return best[2] if best is not None else ()


def _greedy_cover(
    ranked: list[tuple[float, Resident]], missing: float, limit: int
) -> tuple[int, ...]:
    """Cheapest first until enough is freed, unless one resident alone frees enough for less."""
    taken: list[int] = []
    left, value = missing, 0.0
    for i, (worth, r) in enumerate(ranked):
        if left <= 0 or len(taken) == limit:
            break
        taken.append(i)
        left -= r.footprint
        value += worth
    alone = next((i for i, (_, r) in enumerate(ranked) if r.footprint >= missing), None)
    if alone is not None and (left > 0 or ranked[alone][0] < value):
        return (alone,)
    return tuple(taken) if left <= 0 else ()
