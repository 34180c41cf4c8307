"""The scheduling loop, run only by the replica that holds the etcd election.

Each pass takes a fresh snapshot plus the live demand (node telemetry this replica holds: nodes
link to every replica), lets the autoscaler set the copy counts of autoscaled variants, plans
under the policy in force, and writes the changed placements through the registry
(:meth:`~meshserve.controlplane.registry.Registry.write_placements`: transactions that also
check this replica still holds the leader key, so a deposed leader can never write). Every
placement and scale change is an event. A pass that fails is logged and retried; the loop itself
never dies. The clock is read here, once per pass, and passed to the pure scheduler (``now_ms``):
a node kept out by a transient copy failure is retried when its backoff (``retry``) is over, so
a pass runs at that time even when nothing else changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from meshserve.controlplane.etcd import Election
from meshserve.controlplane.etcd._client import jittered
from meshserve.controlplane.link.reconcile import awaits_replacement
from meshserve.controlplane.observe.events import EventSink
from meshserve.controlplane.observe.metrics import ControlPlaneMetrics, controlplane_metrics
from meshserve.controlplane.placement.autoscale import Autoscaler, ScaleChange
from meshserve.controlplane.placement.failures import DEFAULT_RETRY, RetryPolicy, next_retry_ms
from meshserve.controlplane.placement.policies.table import TableMemo
from meshserve.controlplane.placement.scheduler import Plan, RuleSource, plan_placements
from meshserve.controlplane.registry import Registry
from meshserve.controlplane.snapshot import Snapshot, VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["LeaderLoop"]

_log = logging.getLogger("meshserve.controlplane.leader")
_MAX_RETRY_S = 5.0  # the longest pause between failed leader-loop attempts


class LeaderLoop:
    def __init__(
        self,
        *,
        registry: Registry,
        election: Callable[[], Election],
        replica_id: str,
        snapshot: Callable[[], Snapshot],
        interval_s: float = 1.0,
        policy: Callable[[], RuleSource | None] = lambda: None,
        in_flight: Callable[[], Mapping[str, Mapping[VariantKey, float]]] = dict,
        events: EventSink | None = None,
        metrics: ControlPlaneMetrics | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``metrics``: where decisions are counted (default: :func:`controlplane_metrics`).
        ``retry``: the backoff of copy-failure retries; ``clock``: seconds since the epoch."""
        self._registry = registry
        self._new_election = election  # a fresh Election on the replica's current session
        self.election: Election | None = None
        self._replica_id = replica_id
        self._snapshot = snapshot
        self._interval = interval_s
        self._policy = policy
        self._in_flight = in_flight
        self._events = events
        self._metrics = metrics or controlplane_metrics()
        self._retry = retry
        self._clock = clock
        self._wake = asyncio.Event()
        self.autoscaler = Autoscaler()
        self._idle_inputs: tuple[object, ...] | None = None
        self._memo = TableMemo()  # node columns carried from pass to pass (a cache)
        self.passes = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        failures = 0  # in a row: the first is logged with its traceback, the rest in one line
        while True:
            try:
                self.election = election = self._new_election()
                await election.campaign()
                failures = 0
                _log.info("replica %s is the scheduling leader", self._replica_id)
                while election.is_leader:
                    started = time.perf_counter()
                    await self.step()
                    self._metrics.scheduled(time.perf_counter() - started)
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._interval)
                    except TimeoutError:
                        pass
                    self._wake.clear()
                _log.warning("replica %s lost leadership", self._replica_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # etcd away (lease lost, no quorum): retry with a jittered, capped backoff, and
                # do not fill the log with the same traceback every interval.
                wait = jittered(min(self._interval * 2**failures, _MAX_RETRY_S))
                if failures == 0:
                    _log.exception("leader loop failed; retrying")
                else:
                    _log.warning(
                        "leader loop still failing (%s: %s); retry %d in %.1f s",
                        type(exc).__name__,
                        exc,
                        failures + 1,
                        wait,
                    )
                failures += 1
                await asyncio.sleep(wait)

    async def step(self) -> None:
        started = time.perf_counter()
        base = self._snapshot()
        deciding = time.perf_counter()
        flights = self._in_flight()
        snapshot = base.with_in_flight(flights) if flights else base
        desired, changes = self.autoscaler.decide(snapshot)
        policy = self._policy()
        # Nothing a decision depends on changed since a pass that wrote nothing: skip. (Live load
        # only orders candidates; it never makes an unplaceable copy placeable.)
        inputs = (base, policy, desired)
        idle = self._idle_inputs
        now_ms = int(self._clock() * 1000)
        due = next_retry_ms(base.placements.values())
        if (
            idle is not None
            and idle[0] is base
            and idle[1] is policy
            and idle[2] == desired
            and (due is None or now_ms < due)
        ):
            return
        plan = plan_placements(
            snapshot, policy, desired=desired, now_ms=now_ms, retry=self._retry, memo=self._memo
        )
        self._metrics.decided_in(time.perf_counter() - deciding)
        if not plan.upserts and not plan.deletes:
            self._idle_inputs = inputs
            return
        self._idle_inputs = None
        if not await self._registry.write_placements(plan.upserts, plan.deletes, self._replica_id):
            _log.warning("placement write refused: this replica no longer holds the leader key")
            return
        self.passes += 1
        self._count(base, plan, changes)
        for change in changes:
            self._event(
                "scale",
                change.key,
                message=f"copies {change.old} -> {change.new} (demand {change.demand} in flight)",
            )
        for key, placement in plan.upserts.items():
            text = f"nodes {list(placement.nodes)}"
            if placement.failed:
                text += f", failed {dict(placement.failed)}"
            if len(placement.nodes) < placement.desired_copies:
                text += f", {placement.desired_copies - len(placement.nodes)} copies unplaceable"
            stray = _still_serving(base, key, placement)
            if stray:
                text += f"; still served by draining {stray} until a copy is READY elsewhere"
            _log.info("placement %s/%s -> %s", key[0], key[1], text)
            self._event("placement", key, message=text)
        for key in plan.deletes:
            self._event("placement", key, message="removed (model unregistered)")
        for relief in plan.relieved:
            _log.info("placement %s/%s: %s", relief.key[0], relief.key[1], relief.message())
            self._event("placement", relief.key, message=relief.message())
        for ev in plan.evictions:
            text = (
                f"copy on {ev.node_id} evicted for {ev.for_key[0]}/{ev.for_key[1]} "
                f"(value {ev.value:.3g})"
            )
            _log.info("evict %s/%s: %s", ev.key[0], ev.key[1], text)
            if self._events is not None:
                self._events.record(
                    "evict", model=ev.key[0], variant=ev.key[1], node_id=ev.node_id, message=text
                )
        _log.debug("scheduling pass took %.1f ms", (time.perf_counter() - started) * 1e3)

    def _count(self, base: Snapshot, plan: Plan, changes: Sequence[ScaleChange]) -> None:
        """Count the decisions of a written pass: copies placed and unplaced (an evicted copy
        counts as an eviction only), removals, evictions, autoscaler changes."""
        evicted = {(ev.key, ev.node_id) for ev in plan.evictions}
        for key, placement in plan.upserts.items():
            old = base.placements.get(key)
            before = [n for n in (old.nodes if old else ()) if (key, n) not in evicted]
            self._metrics.placed(key, before, placement.nodes)
        for key in plan.deletes:
            self._metrics.decided(key, "remove")
        for ev in plan.evictions:
            self._metrics.evicted(ev.key)
        for change in changes:
            self._metrics.decided(change.key, "scale")

    def _event(self, kind: str, key: VariantKey, *, message: str) -> None:
        if self._events is not None:
            self._events.record(kind, model=key[0], variant=key[1], message=message)


def _still_serving(snapshot: Snapshot, key: VariantKey, placement: mesh_pb2.Placement) -> list[str]:
    """Draining nodes that keep serving a READY copy of ``key`` the placement no longer names
    because no replacement is READY yet (make before break:
    :func:`~meshserve.controlplane.link.reconcile.awaits_replacement` on the view with this
    placement), by id."""
    holders = [
        node_id
        for node_id in sorted(snapshot.draining)
        if node_id not in placement.nodes
        and (node := snapshot.nodes.get(node_id)) is not None
        and node.state(key) == mesh_pb2.READY
    ]
    if not holders:
        return []
    after = dataclasses.replace(snapshot, placements={**snapshot.placements, key: placement})
    return [node_id for node_id in holders if awaits_replacement(after, node_id, key)]
