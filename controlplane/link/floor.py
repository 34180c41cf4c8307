"""The hub's unload safety floor: a mass unload is an episode, held back until confirmed.

Contract:

* :meth:`UnloadFloor.judge` is called with every mesh-wide reconcile's count of Unloads decided
  and of copies the linked nodes hold (a number, or a function counting them: called only when
  the count of Unloads could exceed the floor). An incremental reconcile passes the Unloads of
  the nodes it decided: the others' last decisions were sent in full, so they would decide
  none (controlplane/link/scope.py). Unloads beyond the floor
  (:func:`~meshserve.controlplane.link.reconcile.exceeds_unload_floor`: more than half of the
  copies, and more than two) start an episode: ``alarm(text)`` is called once, and
  :meth:`UnloadFloor.holding` is True -- the hub sends no Unload at all;
* the episode ends when a reconcile decides no Unload (the lost models were registered again,
  or the view came back), and it is confirmed -- Unloads flow again -- once ``confirm_s`` has
  passed since it started (the fallback: a view that keeps asking for the mass unload that long
  is obeyed), or as soon as the operator confirms it (``meshctl nodes confirm-unloads``);
* an operator's confirmation is the value of ``keys.UNLOAD_CONFIRM`` every replica watches
  (:meth:`UnloadFloor.observe_confirmation`): it confirms the current episode only if it differs
  from the value seen when the episode started and is not empty (absent), so a confirmation
  written before an episode never pre-confirms the next one; a confirmed episode stays released
  until a reconcile decides no Unload again (then the next mass unload is a new episode);
* while an episode lasts, a smaller count never ends it early: registering the lost models one
  by one does not release the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from meshserve.controlplane.link.reconcile import UNLOAD_FLOOR_MIN, exceeds_unload_floor

__all__ = ["UnloadFloor"]

_log = logging.getLogger("meshserve.controlplane.hub")


class UnloadFloor:
    """One replica's unload floor (see the module contract)."""

    def __init__(
        self,
        confirm_s: float,
        alarm: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.confirm_s = confirm_s
        self._alarm = alarm
        self._clock = clock
        self._since: float | None = None  # when the current episode started
        self._confirmation = b""  # the latest operator confirmation seen (UNLOAD_CONFIRM)
        self._baseline = b""  # the confirmation seen when the current episode started
        self._confirmed = False  # the operator confirmed the current episode
        self.unloads = 0  # the Unloads the current episode's latest reconcile decided

    def judge(self, unloads: int, held: int | Callable[[], int]) -> None:
        """Account for one mesh-wide reconcile: ``unloads`` decided, ``held`` copies held (or
        a function counting them, called only when ``unloads`` could exceed the floor)."""
        if self._since is not None:
            if unloads == 0:
                _log.warning("unload floor: the view asks for no unload any more; released")
                self._since = None
                self._confirmed = False
            self.unloads = unloads
            return
        if unloads <= UNLOAD_FLOOR_MIN:
            return  # never an episode (exceeds_unload_floor), whatever is held
        if not isinstance(held, int):
            held = held()
        if not exceeds_unload_floor(unloads, held):
            return
        self._since = self._clock()
        self._baseline = self._confirmation
        self._confirmed = False
        self.unloads = unloads
        text = (
            f"the view asks to unload {unloads} of the {held} copies the linked nodes hold at "
            f"once; held back for {self.confirm_s:.0f} s (safety floor): if etcd lost its data, "
            "restore it or register the models again; if the view is right, confirm: "
            "meshctl nodes confirm-unloads"
        )
        _log.error("unload floor: %s", text)
        if self._alarm is not None:
            self._alarm(text)

    def observe_confirmation(self, value: bytes) -> int:
        """The operator's confirmation (``UNLOAD_CONFIRM``'s value, b"" when absent) as this
        replica sees it now; returns how many Unloads it releases (0: no episode held, or not a
        new confirmation -- see the module contract)."""
        self._confirmation = value
        if not value or value == self._baseline or not self.holding():
            return 0
        self._confirmed = True
        _log.warning("unload floor: confirmed by the operator; releasing %d unloads", self.unloads)
        return self.unloads

    def holding(self) -> bool:
        """True while an episode holds every Unload back (started, not yet confirmed)."""
        since = self._since
        return since is not None and not self._confirmed and self._clock() - since < self.confirm_s
