"""Which linked nodes one reconcile pass of the hub decides: incremental reconcile.

Contract:

- :meth:`ReconcileScope.plan` is called with each snapshot the hub reconciles mesh-wide. It
  returns None for a full pass (the first snapshot, an explicit ``full``, and every
  ``full_pass_s`` seconds: the slow safety net), or else the ids of the nodes to decide: those
  the change from the last planned snapshot concerns (:func:`~meshserve.controlplane.link.changes.
  concerned`) and those the hub owes a decision (``due``). Any other linked node would decide
  now exactly what it decided last time, which was sent in full: a full pass would send it
  nothing and count no Unload of it.
- A node is owed a decision (:meth:`ReconcileScope.owe`) from the moment its stream is linked
  or it reports (its copies or claims changed, or a mark was cleared) until a decision of it is
  sent in full: a command left unsent (the stream's queue was full, or the unload safety floor
  holds Unloads back) and a decision taken within the adoption grace
  (:data:`~meshserve.controlplane.link.reconcile.ADOPTION_GRACE_S`: it changes when the grace
  ends, with nothing else changing) keep it owed, so every later pass decides it again.
- :meth:`ReconcileScope.decided` records, for every decision taken (in a pass or for one node),
  the variants the node holds as reconcile saw them: ``holders`` indexes them, the nodes whose
  reconcile reads a variant's placement although it does not name them.
- :meth:`ReconcileScope.forget` drops a node whose stream ended.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from meshserve.controlplane.link.changes import changes, concerned
from meshserve.controlplane.snapshot import Snapshot, VariantKey

__all__ = ["FULL_PASS_S", "ReconcileScope"]

#: The safety net: a full pass over every linked node at least this often (seconds).
FULL_PASS_S = 30.0

_NOTHING: frozenset[VariantKey] = frozenset()


class ReconcileScope:
    """One hub's incremental-reconcile bookkeeping (see the module contract)."""

    def __init__(
        self, full_pass_s: float = FULL_PASS_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.full_pass_s = full_pass_s
        self._clock = clock
        self.holders: dict[VariantKey, set[str]] = {}  # variant -> nodes holding it
        self._held: dict[str, frozenset[VariantKey]] = {}  # node -> variants it holds
        self.due: set[str] = set()  # nodes owed a decision
        self._last: Snapshot | None = None  # the snapshot the last pass planned on
        self._full_at = -math.inf  # when the last full pass was planned
        self.passes = 0  # incremental passes planned
        self.full_passes = 0  # full passes planned

    def plan(self, snapshot: Snapshot, *, full: bool = False) -> set[str] | None:
        """The nodes the pass over ``snapshot`` must decide; None: all of them."""
        last, self._last = self._last, snapshot
        now = self._clock()
        if full or last is None or now - self._full_at >= self.full_pass_s:
            self._full_at = now
            self.full_passes += 1
            return None
        self.passes += 1
        out = concerned(changes(last, snapshot), last, snapshot, self.holders)
        out.update(self.due)
        return out

    def owe(self, node_id: str) -> None:
        """``node_id`` must be decided by the next pass (until a decision of it is sent in full)."""
        self.due.add(node_id)

    def decided(self, node_id: str, held: Iterable[VariantKey], *, fresh: bool) -> None:
        """A decision of ``node_id`` was taken with ``held`` as its copies; ``fresh``: within
        the adoption grace (owed again). Call :meth:`owe` too if a command is left unsent."""
        if fresh:
            self.due.add(node_id)
        else:
            self.due.discard(node_id)
        keys = frozenset(held)
        before = self._held.get(node_id, _NOTHING)
        if keys == before:
            return
        for key in before - keys:
            nodes = self.holders.get(key)
            if nodes is not None:
                nodes.discard(node_id)
                if not nodes:
                    del self.holders[key]
        for key in keys - before:
            self.holders.setdefault(key, set()).add(node_id)
        if keys:
            self._held[node_id] = keys
        else:
            self._held.pop(node_id, None)

    def forget(self, node_id: str) -> None:
        """``node_id``'s stream ended: it holds nothing here and is owed nothing."""
        self.decided(node_id, (), fresh=False)
