"""This replica's presence in etcd: its lease, and its record in the replica list nodes dial.

Contract:

* :meth:`Presence.open` grants the replica's lease (a :class:`~meshserve.controlplane.etcd.Session`)
  and registers ``replicas/<id>`` (id and advertised address) under it, through the registry.
  The same lease anchors every key that must die with this replica: the node records the hub
  writes, wake marks, and the leader key (an election takes :attr:`Presence.session`).
* :meth:`Presence.renew_if_lost` is one maintenance step: when the lease is gone (an etcd outage
  longer than its TTL) it opens a new one, registers the record again and returns True, so the
  caller rewrites what hung on the old lease (node records); otherwise it does nothing.
* :meth:`Presence.close` revokes the lease, so every key on it vanishes now; it is a no-op when
  :meth:`open` never got a lease.
* :func:`replica_list` is pure: the mirrored records decoded, by replica id — what a node learns
  in its Welcome and from every later change, so it can keep a stream to every replica.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from meshserve.controlplane import keys
from meshserve.controlplane.etcd import EtcdClient, Session
from meshserve.controlplane.registry import Registry
from meshserve.protos import mesh_pb2

__all__ = ["Presence", "replica_list"]

_log = logging.getLogger("meshserve.controlplane")


def replica_list(records: Mapping[str, bytes]) -> list[mesh_pb2.ReplicaInfo]:
    """Every replica's record (the values under ``keys.REPLICAS``), sorted by replica id."""
    out = [keys.decode(value, mesh_pb2.ReplicaInfo()) for value in records.values()]
    return sorted(out, key=lambda r: r.replica_id)


class Presence:
    """The lease and record of one replica (see the module contract)."""

    def __init__(
        self, *, etcd: EtcdClient, registry: Registry, replica_id: str, lease_ttl_s: int
    ) -> None:
        self._etcd = etcd
        self._registry = registry
        self._ttl = lease_ttl_s
        self._replica_id = replica_id
        self._address = ""
        self._session: Session | None = None
        self._pending = False  # a new lease whose record is not written yet

    @property
    def session(self) -> Session:
        """The live lease (after :meth:`open`; replaced by :meth:`renew_if_lost`)."""
        assert self._session is not None, "Presence.open() was not awaited"
        return self._session

    @property
    def lease_id(self) -> int:
        return self.session.lease_id

    async def open(self, address: str) -> None:
        """Grant the lease and register this replica as reachable at ``address``."""
        self._address = address
        self._session = await Session.open(self._etcd, self._ttl)
        await self._register()

    async def renew_if_lost(self) -> bool:
        """A new lease and record if the lease was lost (then True); else nothing (False).

        A renewal is complete only once the record is written under the new lease: if that
        write fails (etcd went away again), the next call writes it and returns True then, so
        the caller rewrites the node records that hung on the old lease."""
        if self.session.done.is_set():
            _log.warning("replica lease lost; opening a new one")
            self._session = await Session.open(self._etcd, self._ttl)
            self._pending = True
        if not self._pending:
            return False
        await self._register()
        self._pending = False
        return True

    async def close(self) -> None:
        """Revoke the lease (its keys vanish now); a no-op when none was granted."""
        if self._session is not None:
            await self._session.close(revoke=True)

    async def _register(self) -> None:
        info = mesh_pb2.ReplicaInfo(replica_id=self._replica_id, address=self._address)
        await self._registry.register_replica(info, self.lease_id)
