"""The placement pipeline: filter -> score -> select, over a NodeTable, with no I/O.

Contract:
- :func:`choose` returns up to ``count`` rows for new copies of ``c``: rows every filter of the
  rule accepts, that do not hold a copy yet and have not reached the rule's per-pass load limit,
  picked one at a time by weighted score (sum of weight x plugin score, each plugin in [0, 1]);
  after each pick the row counts as a holder ("assumed", as the Kubernetes scheduler assumes a
  pod) before the next pick is scored, so copies of one variant placed in one pass see each
  other (``spread`` moves the second copy to another zone). Ties go to the lower row (node-id
  order), so a decision is deterministic for a given table.
- :func:`rank` orders the open rows for one more copy (nothing assumed between them).
- :func:`explain` gives the same decision with its reasons: for every node, ``holds a copy``
  (a holder is never run through the filters: its own copy is already counted in its memory),
  or the first filter that rejected it (and why), or its total and per-plugin scores; only the
  holders and the rows :func:`choose` picks are ``selected``.
- :func:`eviction_step` gives the eviction plugin a rule names (``rule.eviction``), built from
  its parameters; the scheduler asks it which copies to evict when a variant is short of its
  minimum for lack of memory.
- Cost: each filter is one vectorised pass over the table; scores run on the feasible rows
  only; selection is a partial sort (O(n + k log k)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from meshserve.common.policy.eviction import EvictionParams
from meshserve.common.policy.rule import EVICTIONS, FILTERS, SCORES
from meshserve.controlplane.placement.policies.plugins import Evict, Filter, Score
from meshserve.controlplane.placement.policies.plugins.affinity import Affinity
from meshserve.controlplane.placement.policies.plugins.anti_affinity import AntiAffinity
from meshserve.controlplane.placement.policies.plugins.bin_packing import BinPacking
from meshserve.controlplane.placement.policies.plugins.cheapest_reload import CheapestReload
from meshserve.controlplane.placement.policies.plugins.demand_locality import DemandLocality
from meshserve.controlplane.placement.policies.plugins.fits_memory import FitsMemory
from meshserve.controlplane.placement.policies.plugins.least_loaded import LeastLoaded
from meshserve.controlplane.placement.policies.plugins.load_cost import LoadCost
from meshserve.controlplane.placement.policies.plugins.never_evict import NeverEvict
from meshserve.controlplane.placement.policies.plugins.not_draining import NotDraining
from meshserve.controlplane.placement.policies.plugins.not_failed import NotFailed
from meshserve.controlplane.placement.policies.plugins.providers import Providers
from meshserve.controlplane.placement.policies.plugins.selector import Selector
from meshserve.controlplane.placement.policies.plugins.spread import Spread
from meshserve.controlplane.placement.policies.table import Candidate, NodeTable

__all__ = [
    "EVICTION_PLUGINS",
    "FILTER_PLUGINS",
    "HOLDER_SCORES",
    "HOLDS",
    "SCORE_PLUGINS",
    "Verdict",
    "choose",
    "eviction_step",
    "explain",
    "feasible",
    "rank",
]

FILTER_PLUGINS: dict[str, Filter] = {
    p.name: p
    for p in (NotDraining(), NotFailed(), Selector(), Providers(), AntiAffinity(), FitsMemory())
}
SCORE_PLUGINS: dict[str, Score] = {
    p.name: p
    for p in (LeastLoaded(), BinPacking(), Spread(), Affinity(), DemandLocality(), LoadCost())
}
# Eviction plugins are built per rule from their parameter model (name -> factory).
EVICTION_PLUGINS: dict[str, Callable[[Any], Evict]] = {
    CheapestReload.name: CheapestReload,
    NeverEvict.name: NeverEvict,
}
assert tuple(FILTER_PLUGINS) == FILTERS and set(SCORE_PLUGINS) == set(SCORES)
assert tuple(EVICTION_PLUGINS) == EVICTIONS

# Scores that depend on where the variant's copies are (``c.holders``): re-scored after each
# pick of a multi-copy decision; every other score of a row is fixed within one decision.
HOLDER_SCORES = frozenset({"spread"})
RATE_LIMIT = "rate_limit"  # pseudo-filter name in explanations
HOLDS = "holds a copy"  # a holder's verdict reason in explanations


@dataclass(frozen=True)
class Verdict:
    node_id: str
    feasible: bool
    filtered_by: str = ""
    reason: str = ""
    score: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    selected: bool = False


def eviction_step(params: EvictionParams) -> Evict:
    """The eviction plugin ``params`` names (a rule's ``eviction``), built from them."""
    return EVICTION_PLUGINS[params.plugin](params)


def _filters(c: Candidate) -> list[Filter]:
    return [FILTER_PLUGINS[name] for name in FILTERS if name in c.rule.filters]


def feasible(table: NodeTable, c: Candidate) -> npt.NDArray[np.bool_]:
    """Rows every filter of the rule accepts."""
    mask = np.ones(len(table), np.bool_)
    for plugin in _filters(c):
        mask &= plugin.accept(table, c)
    return mask


def _open(table: NodeTable, c: Candidate) -> npt.NDArray[np.bool_]:
    mask = feasible(table, c)
    mask[c.holders] = False
    mask &= table.loads < c.rule.max_loads_per_node
    return mask


def _scores(
    table: NodeTable, c: Candidate, rows: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.float64], dict[str, npt.NDArray[np.float64]]]:
    total = np.zeros(len(rows))
    parts: dict[str, npt.NDArray[np.float64]] = {}
    for name, weight in c.rule.weights.items():
        if weight <= 0:
            continue
        values = SCORE_PLUGINS[name].score(table, c, rows)
        parts[name] = values
        total += weight * values
    return total, parts


def _best(total: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.int64]:
    """Positions of the ``k`` highest totals, best first, ties by position."""
    if k < len(total):
        top = np.argpartition(-total, k - 1)[:k]
    else:
        top = np.arange(len(total))
    return top[np.lexsort((top, -total[top]))]


def rank(table: NodeTable, c: Candidate, count: int) -> list[int]:
    """Up to ``count`` open rows, best first, for ONE more copy of ``c`` (nothing assumed
    between them: the alternatives for the same copy, as the eviction step weighs them)."""
    return choose(table, c, count, assume=False)


def choose(table: NodeTable, c: Candidate, count: int, *, assume: bool = True) -> list[int]:
    if count <= 0 or len(table) == 0:
        return []
    rows = np.flatnonzero(_open(table, c))
    if rows.size == 0:
        return []
    total, parts = _scores(table, c, rows)
    moving = [name for name in parts if name in HOLDER_SCORES]
    if count == 1 or not moving or not assume:
        return [int(r) for r in rows[_best(total, min(count, rows.size))]]
    # Pick one at a time; after each pick, assume it (it holds a copy now) and re-score only
    # what depends on where the copies are (the other scores of a row do not change). A picked
    # row's fixed part is -inf, so it is never picked again; argmax ties go to the lower row.
    fixed = total - sum(c.rule.weights[name] * parts[name] for name in moving)
    picked: list[int] = []
    count = min(count, rows.size)
    while True:
        at = int(np.argmax(total))
        picked.append(int(rows[at]))
        if len(picked) == count:
            return picked
        c = replace(c, holders=np.append(c.holders, rows[at]))
        fixed[at] = -np.inf
        total = fixed.copy()
        for name in moving:
            total += c.rule.weights[name] * SCORE_PLUGINS[name].score(table, c, rows)


def explain(table: NodeTable, c: Candidate, count: int) -> list[Verdict]:
    """Every node's verdict for placing ``count`` more copies (holders first, then chosen, then
    the other feasible nodes by score, then the filtered ones)."""
    chosen = set(choose(table, c, count))
    holders = {int(r) for r in c.holders}
    filters = _filters(c)
    masks = [(plugin, plugin.accept(table, c)) for plugin in filters]
    held: list[Verdict] = []
    out: list[Verdict] = []
    open_rows = []
    for row in range(len(table)):
        node_id = table.ids[row]
        rejected = next((p for p, m in masks if not m[row]), None)
        if row in holders:
            held.append(Verdict(node_id, True, reason=HOLDS, selected=True))
        elif rejected is not None:
            out.append(Verdict(node_id, False, rejected.name, rejected.reason(table, c, row)))
        elif row not in holders and table.loads[row] >= c.rule.max_loads_per_node:
            out.append(
                Verdict(
                    node_id,
                    False,
                    RATE_LIMIT,
                    f"already given {int(table.loads[row])} new copies this pass "
                    f"(max_loads_per_node {c.rule.max_loads_per_node})",
                )
            )
        else:
            open_rows.append(row)
    rows = np.array(open_rows, np.int64)
    total, parts = _scores(table, c, rows) if rows.size else (np.zeros(0), {})
    scored = [
        Verdict(
            table.ids[row],
            True,
            score=round(float(total[i]), 6),
            scores={name: round(float(v[i]), 6) for name, v in parts.items()},
            selected=row in chosen,
        )
        for i, row in enumerate(open_rows)
    ]
    scored.sort(key=lambda v: (not v.selected, -v.score, v.node_id))
    return held + scored + sorted(out, key=lambda v: v.node_id)
