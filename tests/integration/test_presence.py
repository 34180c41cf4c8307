"""A replica's presence (controlplane/link/presence.py) against a real etcd: its record lives
under its lease, comes back under a new lease when the old one is lost, and vanishes on close."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshserve.controlplane import keys
from meshserve.controlplane.etcd._client import get, get_prefix, revoke_lease
from meshserve.controlplane.link.presence import Presence, replica_list
from meshserve.controlplane.registry import EtcdRegistry
from meshserve.protos import mesh_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def _record(client: Any, replica_id: str) -> tuple[mesh_pb2.ReplicaInfo, int] | None:
    kv = await get(client, keys.replica_key(replica_id).encode())
    if kv is None:
        return None
    return keys.decode(kv.value, mesh_pb2.ReplicaInfo()), kv.lease


async def test_the_record_follows_the_lease_through_a_loss_and_a_close(client: Any) -> None:
    presence = Presence(
        etcd=client, registry=EtcdRegistry(client), replica_id="cp-a", lease_ttl_s=3
    )
    await presence.open("127.0.0.1:9001")
    first = presence.lease_id
    stored = await _record(client, "cp-a")
    assert stored is not None
    assert (stored[0].replica_id, stored[0].address, stored[1]) == ("cp-a", "127.0.0.1:9001", first)
    assert await presence.renew_if_lost() is False  # a live lease: nothing is written
    assert presence.lease_id == first

    await revoke_lease(client, first)  # etcd forgets the lease: the record goes with it
    assert await _record(client, "cp-a") is None
    await asyncio.wait_for(presence.session.done.wait(), 10)
    assert await presence.renew_if_lost() is True
    stored = await _record(client, "cp-a")
    assert stored is not None and stored[1] == presence.lease_id != first
    assert stored[0].address == "127.0.0.1:9001"

    await presence.close()
    assert await _record(client, "cp-a") is None


class _FailsOnce(EtcdRegistry):
    """The real registry, whose next replica-record write fails once (etcd gone again)."""

    fail_next = False

    async def register_replica(self, info: mesh_pb2.ReplicaInfo, lease: int) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("etcd unreachable")
        await super().register_replica(info, lease)


async def test_a_renewal_whose_record_write_failed_is_finished_by_the_next_step(
    client: Any,
) -> None:
    registry = _FailsOnce(client)
    presence = Presence(etcd=client, registry=registry, replica_id="cp-c", lease_ttl_s=3)
    await presence.open("127.0.0.1:9003")
    first = presence.lease_id
    await revoke_lease(client, first)
    await asyncio.wait_for(presence.session.done.wait(), 10)
    registry.fail_next = True
    with pytest.raises(ConnectionError):
        await presence.renew_if_lost()
    assert await _record(client, "cp-c") is None
    # The lease is live again, but the record (and the node records the caller rewrites on
    # True) is still missing: the next maintenance step must finish the renewal.
    assert await presence.renew_if_lost() is True
    stored = await _record(client, "cp-c")
    assert stored is not None and stored[1] == presence.lease_id != first
    assert await presence.renew_if_lost() is False
    await presence.close()


async def test_close_before_open_does_nothing(client: Any) -> None:
    presence = Presence(
        etcd=client, registry=EtcdRegistry(client), replica_id="cp-b", lease_ttl_s=3
    )
    await presence.close()
    _, kvs = await get_prefix(client, keys.REPLICAS.encode())
    assert kvs == []


def test_replica_list_is_decoded_and_sorted_by_id() -> None:
    records = {
        keys.replica_key(r): keys.encode(mesh_pb2.ReplicaInfo(replica_id=r, address=f"{r}:1"))
        for r in ("cp-c", "cp-a", "cp-b")
    }
    assert [(r.replica_id, r.address) for r in replica_list(records)] == [
        ("cp-a", "cp-a:1"),
        ("cp-b", "cp-b:1"),
        ("cp-c", "cp-c:1"),
    ]
    assert replica_list({}) == []
