"""The scheduling loop, run only by the replica that holds the etcd election.

Each pass plans from a fresh snapshot and writes the changed placements in one transaction that
also checks this replica still holds the leader key (a deposed leader can never write). A pass
that fails is logged and retried; the loop itself never dies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from controlplane import keys
from controlplane.etcd import Election
from controlplane.scheduler import plan_placements
from controlplane.snapshot import Snapshot

__all__ = ["LeaderLoop"]

_log = logging.getLogger("meshserve.controlplane.leader")


class LeaderLoop:
    def __init__(
        self,
        *,
        etcd: Any,
        election: Callable[[], Election],
        replica_id: str,
        snapshot: Callable[[], Snapshot],
        interval_s: float = 1.0,
    ) -> None:
        self._etcd = etcd
        self._new_election = election  # a fresh Election on the replica's current session
        self.election: Election | None = None
        self._replica_id = replica_id
        self._snapshot = snapshot
        self._interval = interval_s
        self._wake = asyncio.Event()
        self.passes = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                self.election = election = self._new_election()
                await election.campaign()
                _log.info("replica %s is the scheduling leader", self._replica_id)
                while election.is_leader:
                    await self.step()
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._interval)
                    except TimeoutError:
                        pass
                    self._wake.clear()
                _log.warning("replica %s lost leadership", self._replica_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("leader loop failed; retrying")
                await asyncio.sleep(self._interval)

    async def step(self) -> None:
        started = time.perf_counter()
        plan = plan_placements(self._snapshot())
        if not plan.upserts and not plan.deletes:
            return
        t = self._etcd.transactions
        ops = [
            t.put(keys.placement_key(*k).encode(), keys.encode(p)) for k, p in plan.upserts.items()
        ]
        ops += [t.delete(keys.placement_key(*k).encode()) for k in plan.deletes]
        ok, _ = await self._etcd.transaction(
            compare=[t.value(keys.LEADER.encode()) == self._replica_id.encode()],
            success=ops,
            failure=[],
        )
        self.passes += 1
        if not ok:
            _log.warning("placement write refused: this replica no longer holds the leader key")
            return
        for key, placement in plan.upserts.items():
            _log.info(
                "placement %s/%s -> %s%s",
                key[0],
                key[1],
                list(placement.nodes),
                f" failed={dict(placement.failed)}" if placement.failed else "",
            )
        _log.debug("scheduling pass took %.1f ms", (time.perf_counter() - started) * 1e3)
