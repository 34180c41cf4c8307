"""Admission control at the gateway: bounded in-flight queries per model and per client.

Contract:
- :meth:`Admission.admit` either returns a :class:`Ticket` (the query may proceed) or raises
  :class:`~meshserve.common.errors.ResourceExhausted` at once, never waits. Every ticket is released
  exactly once (:meth:`Ticket.release`, idempotent), on success or failure.
- A model admits at most ``per_copy`` x (its ready copies, at least 1) queries in flight through
  this gateway; a client (its API-key tenant, else its ``x-client-id`` metadata, else its peer
  host) at most ``per_client`` across models. 0 turns a limit off. Without API keys the caller
  names itself (``x-client-id``): the per-client limit then holds only callers that do not
  rotate it; with keys, the tenant is the client whatever ids it sends (a standalone gateway's
  relayed queries count against its own key's tenant at the replica).
- A refusal carries a retry-after hint: the model's recent mean answer time scaled by how far
  over the limit it is (bounded to [10 ms, 2 s]), the time in which a slot should free up.
- Shedding by predicted wait (``shed_late``, on unless admission is off: both limits 0): the
  gateway refuses a query whose predicted completion on every copy exceeds :data:`HEADROOM` of
  the time its deadline leaves (the node's own rule); :meth:`Admission.shed` is that refusal,
  RESOURCE_EXHAUSTED with the excess wait as retry-after hint (at least 10 ms), counted in
  ``refused`` and ``shed_count``. What predictions miss (the gateway's own queueing, the
  caller's, a tail the median does not show) is learned per model from outcomes
  (:meth:`Admission.settled`): each admitted query that misses its deadline (or that the node
  refuses: it saw the wait the gateway did not) narrows the share
  of the budget shedding allows (:meth:`Admission.margin`, x 0.95, at least 0.3), each one in
  time widens it back (+ 0.001, at most 1): about 2 % of admitted queries may miss.

Why at the gateway: past the limits every further query only lengthens the queues on the nodes
until every answer misses its deadline (goodput collapse); refusing the excess at once, cheaply,
keeps the admitted ones fast and tells callers (the SDK retries with the hint) when to return.
The counts are per replica: with R replicas a model admits up to R x the limit in total.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from meshserve.common.errors import ResourceExhausted

__all__ = ["HEADROOM", "Admission", "Ticket"]

_MIN_HINT_S = 0.010
_MAX_HINT_S = 2.0

#: A query is sent on only when its predicted completion is within this share of the time its
#: deadline leaves (the same margin a node sheds by: meshserve.node.service).
HEADROOM = 0.75
_MIN_MARGIN, _MARGIN_CUT, _MARGIN_STEP = 0.3, 0.95, 0.001


@dataclass(slots=True)
class _Model:
    in_flight: int = 0
    ewma_s: float = 0.0  # mean answer time of admitted queries
    margin: float = 1.0  # share of the deadline's budget shedding allows (see settled)


@dataclass(slots=True)
class Ticket:
    """One admitted query; :meth:`release` when it is answered (or failed)."""

    _owner: Admission
    model: str
    client: str
    started: float
    _done: bool = field(default=False)

    def release(self, ok: bool = True) -> None:
        if not self._done:
            self._done = True
            self._owner._release(self, ok)


class Admission:
    def __init__(
        self,
        *,
        per_copy: int = 64,
        per_client: int = 1024,
        shed_late: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``shed_late``: refuse queries predicted to miss their deadline (None: unless both
        limits are off, i.e. admission is off altogether)."""
        if per_copy < 0 or per_client < 0:
            raise ValueError("admission limits must be >= 0 (0: off)")
        self.per_copy = per_copy
        self.per_client = per_client
        self.shed_late = bool(per_copy or per_client) if shed_late is None else shed_late
        self._clock = clock
        self._models: dict[str, _Model] = {}
        self._clients: dict[str, int] = {}
        self.refused = 0
        self.shed_count = 0

    def in_flight(self, model: str) -> int:
        stat = self._models.get(model)
        return stat.in_flight if stat is not None else 0

    def admit(self, model: str, copies: int, client: str = "") -> Ticket:
        """Admit one query for ``model`` (``copies``: its ready copies now) from ``client``."""
        stat = self._models.get(model)
        if stat is None:
            stat = self._models[model] = _Model()
        limit = self.per_copy * max(1, copies)
        if self.per_copy and stat.in_flight >= limit:
            self.refused += 1
            raise ResourceExhausted(
                f"model {model!r} has {stat.in_flight} queries in flight at this gateway "
                f"(limit {self.per_copy} per ready copy x {max(1, copies)})",
                self._hint(stat, stat.in_flight - limit + 1, limit),
            )
        held = self._clients.get(client, 0)
        if self.per_client and held >= self.per_client:
            self.refused += 1
            raise ResourceExhausted(
                f"client has {held} queries in flight at this gateway (limit {self.per_client})",
                self._hint(stat, held - self.per_client + 1, self.per_client),
            )
        stat.in_flight += 1
        self._clients[client] = held + 1
        return Ticket(self, model, client, self._clock())

    def margin(self, model: str) -> float:
        """The share of a query's budget (``HEADROOM`` x time left) shedding allows ``model``."""
        stat = self._models.get(model)
        return stat.margin if stat is not None else 1.0

    def settled(self, model: str, missed: bool) -> None:
        """An admitted query to ``model`` with a deadline ended: ``missed`` it (answered late,
        cut short by it, abandoned by its caller) or not (see the module contract)."""
        stat = self._models.get(model)
        if stat is None:
            return
        if missed:
            stat.margin = max(_MIN_MARGIN, stat.margin * _MARGIN_CUT)
        elif stat.margin < 1.0:
            stat.margin = min(1.0, stat.margin + _MARGIN_STEP)

    def shed(self, model: str, predicted_s: float, remaining_s: float) -> ResourceExhausted:
        """The refusal of a query to ``model`` predicted to complete in ``predicted_s`` at the
        earliest with ``remaining_s`` left before its deadline (counted; raise it)."""
        self.refused += 1
        self.shed_count += 1
        return ResourceExhausted(
            f"model {model!r} would answer in about {predicted_s * 1000:.0f} ms at the earliest "
            f"on any copy, past the query's deadline ({max(0.0, remaining_s) * 1000:.0f} ms "
            "left)",
            max(_MIN_HINT_S, predicted_s - HEADROOM * remaining_s),
        )

    def _hint(self, stat: _Model, over: int, limit: int) -> float:
        mean = stat.ewma_s or _MIN_HINT_S
        return min(_MAX_HINT_S, max(_MIN_HINT_S, mean * (1.0 + over / max(1, limit))))

    def _release(self, ticket: Ticket, ok: bool) -> None:
        stat = self._models.get(ticket.model)
        if stat is not None:
            stat.in_flight -= 1
            if ok:
                elapsed = self._clock() - ticket.started
                stat.ewma_s = elapsed if not stat.ewma_s else 0.8 * stat.ewma_s + 0.2 * elapsed
        held = self._clients.get(ticket.client, 0) - 1
        if held > 0:
            self._clients[ticket.client] = held
        else:
            self._clients.pop(ticket.client, None)
