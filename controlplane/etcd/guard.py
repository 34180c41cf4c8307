"""Pure judgements about the etcd store itself: was it replaced, and how far to compact it.

Contract:

* :func:`store_replaced` tells a store that lost its data apart from one that merely went away
  and came back: etcd restarted on the same address with an empty (or an older, restored) data
  directory answers with a revision lower than one this process has already seen, or with
  another cluster id. A watch started from the old revision would then wait silently for a
  revision the new store reaches only much later, so the caller must reload its view from
  scratch (and must not act on it blindly: see the hub's unload floor). Returns the reason, or
  None when the store is the one seen before.
* :func:`compaction_target` says up to which revision to compact so that at most
  ``keep`` revisions of history stay (None: nothing worth doing yet), so etcd's database stops
  growing with superseded values while a watcher that lags by less than ``keep`` revisions still
  resumes without a full reload.

Both are pure functions of their arguments (no I/O, no clock): table-tested in
``tests/unit/test_store_guard.py``. :class:`StoreGuard` is the maintenance step that applies
them (one :meth:`StoreGuard.step` per pass): it reads the store's status, reloads every mirror
from scratch after a replacement (one alarm per episode) and, on the leader, compacts.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from meshserve.controlplane.etcd._client import EtcdStatus
from meshserve.controlplane.etcd.watch import PrefixMirror

__all__ = [
    "COMPACT_KEEP_REVISIONS",
    "COMPACT_MIN_STEP",
    "StoreGuard",
    "compaction_target",
    "store_replaced",
]

log = logging.getLogger("meshserve.controlplane.etcd")

#: Revisions of history kept behind the current one by periodic compaction.
COMPACT_KEEP_REVISIONS: Final = 10_000
#: Compact only when at least this many revisions were added since the last compaction.
COMPACT_MIN_STEP: Final = 1_000


def store_replaced(
    known_cluster_id: int,
    seen_revision: int,
    status: EtcdStatus,
    *,
    known_store_id: str = "",
    store_id: str = "",
) -> str | None:
    """Why ``status`` comes from another store than the one this process watched, or None.

    ``known_cluster_id``: the cluster id first seen (0: none seen yet -- never a replacement);
    ``seen_revision``: the highest revision this process has applied from the store;
    ``known_store_id`` / ``store_id``: the store's id (``keys.STORE_ID``) as first read and as
    read now ("": not read) -- catches a replaced store whose revision has already grown past
    the one seen (a single-member etcd restarted empty keeps its cluster id)."""
    if known_cluster_id and status.cluster_id != known_cluster_id:
        return (
            f"etcd cluster id changed from {known_cluster_id:x} to {status.cluster_id:x} "
            "(another cluster answers on the same address)"
        )
    if status.revision < seen_revision:
        return (
            f"etcd revision went backwards from {seen_revision} to {status.revision} "
            "(its data directory was lost or restored from an older backup)"
        )
    if known_store_id and store_id and store_id != known_store_id:
        return (
            f"etcd's store id changed from {known_store_id} to {store_id} "
            "(its data directory was replaced)"
        )
    return None


def compaction_target(
    revision: int,
    compacted: int,
    *,
    keep: int = COMPACT_KEEP_REVISIONS,
    min_step: int = COMPACT_MIN_STEP,
) -> int | None:
    """The revision to compact up to, keeping ``keep`` revisions behind ``revision``; None when
    that is less than ``min_step`` past ``compacted`` (the last compaction, 0: none)."""
    target = revision - keep
    if target <= 0 or target < compacted + min_step:
        return None
    return target


class StoreGuard:
    """The store's watchman, run as one step of a replica's maintenance loop.

    * ``status``: reads the store's :class:`EtcdStatus` (the registry's ``store_status``);
    * ``compact``: compacts up to a revision (the registry's ``compact``), called only while
      ``is_leader()`` -- one replica compacts for the mesh;
    * ``alarm``: called once per replacement episode with the reason (an event: the webhook and
      ``meshctl events`` see it);
    * ``store_id``: returns the store's id, writing the given candidate if it has none; read at
      every step (a changed id is a replacement too) and kept in :attr:`store_id`, which is
      stamped on every Load and Unload so nodes compare placement revisions only within one
      store.

    :meth:`step` raises what the store raises (etcd down: the next pass tries again); a reload
    that failed part-way is retried by the next step, since the mirrors still show the old
    revisions.
    """

    def __init__(
        self,
        *,
        status: Callable[[], Awaitable[EtcdStatus]],
        compact: Callable[[int], Awaitable[bool]],
        mirrors: Callable[[], Sequence[PrefixMirror]],
        is_leader: Callable[[], bool],
        alarm: Callable[[str], None],
        keep: int = COMPACT_KEEP_REVISIONS,
        store_id: Callable[[str], Awaitable[str]] | None = None,
    ) -> None:
        self._status = status
        self._compact = compact
        self._mirrors = mirrors
        self._is_leader = is_leader
        self._alarm = alarm
        self._keep = keep
        self._ensure_store_id = store_id
        self.store_id = ""  # the store's id (keys.STORE_ID): "" until read
        self._cluster_id = 0
        self._compacted = 0
        self._episode = False  # a replacement seen and not reloaded from yet
        self.last: EtcdStatus | None = None  # the latest status read (db size: diagnostics)
        self.replacements = 0  # replacements detected and reloaded from (diagnostics)

    async def step(self) -> None:
        """Read the status; reload after a replacement; compact on the leader."""
        # What the mirrors applied is read before the status: events applied while the status
        # call is awaited may be newer than the revision it answers with (a false "went
        # backwards" that reloaded every mirror under churn).
        mirrors = self._mirrors()
        seen = max((m.revision for m in mirrors), default=0)
        status = await self._status()
        self.last = status
        current = ""  # the store's id now: create-if-absent, no write when it exists
        if self._ensure_store_id is not None:
            current = await self._ensure_store_id(uuid.uuid4().hex)
        why = store_replaced(
            self._cluster_id, seen, status, known_store_id=self.store_id, store_id=current
        )
        self.store_id = current
        if why is not None:
            if not self._episode:
                self._episode = True
                log.error("etcd store replaced: %s; reloading the view from scratch", why)
                self._alarm(why)
            for mirror in mirrors:
                await mirror.reload()
            self._episode = False
            self._compacted = 0
            self.replacements += 1
        self._cluster_id = status.cluster_id
        if self._is_leader():
            target = compaction_target(
                status.revision, self._compacted, keep=self._keep, min_step=max(1, self._keep // 10)
            )
            if target is not None:
                await self._compact(target)
                self._compacted = target
                log.info(
                    "etcd compacted up to revision %d (db %.1f MiB, %.1f MiB in use)",
                    target,
                    status.db_size / 2**20,
                    status.db_size_in_use / 2**20,
                )
