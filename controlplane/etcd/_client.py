"""Typed boundary over the untyped ``aetcd`` client.

Every call into aetcd made by this package goes through the functions here, which
turn aetcd's (protobuf-backed, untyped) results into small frozen dataclasses.  The
client object itself stays :data:`typing.Any` (``EtcdClient``); nothing else leaks.

Errors are aetcd's own (``aetcd.exceptions.*``); :data:`TRANSIENT_ERRORS` lists those
that mean "etcd unreachable / busy, retry later".
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeAlias

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils

from meshserve.common.errors import EOF
from meshserve.controlplane.etcd.link import reauthenticate, stale_token, stale_token_text

__all__ = [
    "TRANSIENT_ERRORS",
    "ClientError",
    "ConnectionFailedError",
    "EtcdClient",
    "EtcdStatus",
    "KeyValue",
    "RevisionCompactedError",
    "WatchEvent",
    "WatchStream",
    "client_closed",
    "compact",
    "create_if_absent",
    "delete_if",
    "get",
    "get_prefix",
    "grant_lease",
    "jittered",
    "refresh_lease",
    "revoke_lease",
    "status",
    "watch",
]

#: An ``aetcd.Client`` (untyped library: this is the one place ``Any`` is accepted).
EtcdClient: TypeAlias = Any

#: etcd unreachable (gRPC UNAVAILABLE): refused connection, stream removed on restart.
ConnectionFailedError: type[Exception] = aetcd.exceptions.ConnectionFailedError
#: The base class of every aetcd error.
ClientError: type[Exception] = aetcd.exceptions.ClientError
#: A watch asked for history that etcd has compacted away.
RevisionCompactedError: type[Exception] = aetcd.exceptions.RevisionCompactedError

#: Errors after which an operation may be retried: etcd down/restarting, RPC deadline
#: exceeded, a watch that could not be created in time, or a local timeout.
#: ``aetcd.exceptions.ClientError`` is the base class of every aetcd error (including
#: unmapped gRPC codes such as CANCELLED/UNKNOWN seen while a server shuts down);
#: callers that need to single out ``RevisionCompactedError`` must catch it first.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    aetcd.exceptions.ClientError,
    TimeoutError,
)


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as stored by etcd (mirror of ``mvccpb.KeyValue``)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class EtcdStatus:
    """What the answering member says of its store: which cluster it belongs to, the store's
    revision now (from a linearizable read), and the database file's size."""

    cluster_id: int
    member_id: int
    revision: int
    raft_term: int
    db_size: int  # bytes of the backend file (etcd's dbSize)
    db_size_in_use: int  # bytes of it holding data (the rest is freed pages)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One watch event. For ``DELETE``, ``kv.mod_revision`` is the deletion revision."""

    kind: Literal["PUT", "DELETE"]
    kv: KeyValue


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        key=bytes(raw.key),
        value=bytes(raw.value),
        create_revision=int(raw.create_revision),
        mod_revision=int(raw.mod_revision),
        version=int(raw.version),
        lease=int(raw.lease),
    )


#: The key :func:`status` reads (never written): inside ``/meshserve/``, the one prefix the
#: mesh's etcd user is granted (docs/security.md), so the read is allowed with auth on.
_STATUS_PROBE = b"/meshserve/\0status-probe"


def jittered(delay: float) -> float:
    """A retry pause of about ``delay``: uniformly in ``[delay / 2, delay]``, so the retries of
    many watchers (and of many replicas) after one etcd outage do not arrive in step."""
    return delay * random.uniform(0.5, 1.0)


def client_closed(client: EtcdClient) -> bool:
    """True once ``client.close()`` ran (aetcd drops its channel on close)."""
    return getattr(client, "channel", None) is None


async def grant_lease(client: EtcdClient, ttl: int) -> tuple[int, int]:
    """Grant a lease; returns ``(lease_id, granted_ttl)``.

    etcd may grant a longer TTL than asked (its minimum is ~2 s by default).
    """
    lease = await client.lease(ttl)
    return int(lease.id), int(lease.ttl)


async def refresh_lease(client: EtcdClient, lease_id: int) -> int | None:
    """Send one keep-alive; returns the new TTL (``<= 0``: the lease no longer exists),
    or ``None`` when the stream closed without an answer (treat as transient)."""
    stale = client.metadata
    try:
        reply = await client.refresh_lease(lease_id)
    except ClientError as exc:  # a stream: the channel's own token renewal covers unary calls
        if not stale or not stale_token(exc):
            raise
        await reauthenticate(client, stale)
        reply = await client.refresh_lease(lease_id)
    if reply is None:
        return None
    return int(reply.TTL)


async def revoke_lease(client: EtcdClient, lease_id: int) -> None:
    """Revoke a lease (deleting its keys). Raises aetcd's ``ClientError`` if unknown."""
    await client.revoke_lease(lease_id)


async def status(client: EtcdClient) -> EtcdStatus:
    """The member's status plus a linearizable read's revision (``aetcd``'s own ``status``
    drops the response header, which carries the cluster id).

    A status answer is served by the member itself and may lag the cluster; the revision is
    taken from a linearizable range read instead, which never goes backwards unless the store
    itself was replaced (a lost or restored data directory)."""
    try:
        raw = await client.maintenancestub.Status(
            aetcd.rpc.StatusRequest(), timeout=client._timeout, metadata=client.metadata
        )
    except aetcd.rpc.AioRpcError as exc:
        aetcd.exceptions._handle_exception(exc)
        raise  # pragma: no cover - the handler always raises
    read = await client.get_prefix(_STATUS_PROBE, keys_only=True)
    return EtcdStatus(
        cluster_id=int(raw.header.cluster_id),
        member_id=int(raw.header.member_id),
        revision=int(read.header.revision),
        raft_term=int(raw.raftTerm),
        db_size=int(raw.dbSize),
        db_size_in_use=int(raw.dbSizeInUse),
    )


async def compact(client: EtcdClient, revision: int) -> None:
    """Compact the key-value history up to ``revision`` (every superseded value older than it
    is dropped; watches from before it fail with ``RevisionCompactedError``). Compacting at or
    below the last compaction fails with aetcd's ``ClientError`` (harmless: already done)."""
    await client.compact(revision)


async def get(client: EtcdClient, key: bytes) -> KeyValue | None:
    """Linearizable read of one key."""
    raw = await client.get(key)
    return None if raw is None else _kv(raw)


async def get_prefix(client: EtcdClient, prefix: bytes) -> tuple[int, list[KeyValue]]:
    """Linearizable read of every key under ``prefix``; returns ``(revision, kvs)``
    where ``revision`` is the store revision the read observed (from the header)."""
    result = await client.get_prefix(prefix)
    return int(result.header.revision), [_kv(raw) for raw in result]


async def create_if_absent(
    client: EtcdClient, key: bytes, value: bytes, lease_id: int
) -> tuple[bool, int, KeyValue | None]:
    """Atomically put ``key=value`` (attached to ``lease_id``) iff the key does not exist.

    Returns ``(created, revision, existing)``: on success ``revision`` is the revision
    of the put (== the key's ``create_revision``) and ``existing`` is ``None``; on
    failure ``revision`` is the store revision of the transaction and ``existing`` the
    key that blocked it.
    """
    tx = client.transactions
    succeeded, responses = await client.transaction(
        compare=[tx.create(key) == 0],
        success=[tx.put(key, value, lease=lease_id)],
        failure=[tx.get(key)],
    )
    if succeeded:
        return True, int(responses[0].response_put.header.revision), None
    ranged: list[tuple[bytes, Any]] = list(responses[0]) if responses else []
    if not ranged:  # deleted between compare and get cannot happen within one txn
        return False, 0, None
    got = ranged[0][1]
    return False, int(got.header.revision), _kv(got)


async def delete_if(
    client: EtcdClient,
    key: bytes,
    *,
    value: bytes | None = None,
    create_revision: int | None = None,
    mod_revision: int | None = None,
) -> bool:
    """Delete ``key`` iff every given condition holds; returns whether it was deleted.

    At least one condition is required.
    """
    tx = client.transactions
    compare: list[Any] = []
    if value is not None:
        compare.append(tx.value(key) == value)
    if create_revision is not None:
        compare.append(tx.create(key) == create_revision)
    if mod_revision is not None:
        compare.append(tx.mod(key) == mod_revision)
    if not compare:
        raise ValueError("delete_if needs at least one condition")
    succeeded, _ = await client.transaction(compare=compare, success=[tx.delete(key)], failure=[])
    return bool(succeeded)


class WatchStream:
    """An established etcd watch on its own gRPC stream. Iterate for :class:`WatchEvent`;
    :meth:`cancel` ends it.

    Iteration raises ``ConnectionFailedError`` (and other ``ClientError``) when the stream
    breaks and ``RevisionCompactedError`` when the start revision was compacted; it ends
    normally after :meth:`cancel` or when the client is closed. Events of one revision are
    delivered back to back without yielding to the event loop.

    Each watch is one ``Watch`` call of its own (multiplexed on the client's channel), not a
    callback on aetcd's shared watcher: that watcher queues requests in a bounded queue under
    its lock, and a stream that broke while ten cancels were queued (every mirror reloading
    after etcd restarted) deadlocked it for good -- every later watch waited forever.
    Cancelling is local and immediate (the call is cancelled; etcd drops its watch with it).
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False

    async def __aiter__(self) -> AsyncIterator[WatchEvent]:
        put = aetcd.rpc.Event.PUT
        while True:
            try:
                response = await self._call.read()
            except asyncio.CancelledError:
                if self._cancelled:
                    return
                raise
            except aetcd.rpc.AioRpcError as exc:
                if self._cancelled:
                    return
                _raise_mapped(exc)
            if response is EOF:
                if self._cancelled:
                    return
                raise ConnectionFailedError("the etcd watch stream ended")
            if response.compact_revision:
                raise RevisionCompactedError(response.compact_revision)
            if response.canceled:
                if self._cancelled:
                    return
                raise ClientError(f"etcd cancelled the watch: {response.cancel_reason}")
            for event in response.events:
                yield WatchEvent("PUT" if event.type == put else "DELETE", _kv(event.kv))

    async def cancel(self) -> None:
        """End the watch (local: the call is cancelled); never raises."""
        self._cancelled = True
        self._call.cancel()


def _raise_mapped(exc: BaseException) -> NoReturn:
    """Raise ``exc`` as aetcd's error for its gRPC code (the errors every caller handles)."""
    try:
        aetcd.exceptions._handle_exception(exc)  # aetcd's own mapping
    except ClientError:
        raise
    raise ClientError(str(exc)) from exc  # pragma: no cover - the mapping always raises


async def watch(
    client: EtcdClient, key: bytes, *, start_revision: int, prefix: bool = False
) -> WatchStream:
    """Create a watch on ``key`` (or every key under it when ``prefix``) delivering
    events with revision ``>= start_revision``.  Returns once etcd confirmed it, within the
    client's timeout (:class:`TimeoutError` otherwise). A watch refused for a stale auth token
    (etcd restarted, or another member answers) re-authenticates and is tried once more."""
    stale = client.metadata
    try:
        return await _watch_once(client, key, start_revision=start_revision, prefix=prefix)
    except ClientError as exc:
        if not stale or not (stale_token(exc) or stale_token_text(str(exc))):
            raise
    await reauthenticate(client, stale)
    return await _watch_once(client, key, start_revision=start_revision, prefix=prefix)


async def _watch_once(
    client: EtcdClient, key: bytes, *, start_revision: int, prefix: bool
) -> WatchStream:
    request = aetcd.rpc.WatchRequest(
        create_request=aetcd.rpc.WatchCreateRequest(
            key=key,
            range_end=aetcd.utils.prefix_range_end(key) if prefix else b"",
            start_revision=start_revision,
        )
    )
    call = aetcd.rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
    try:
        async with asyncio.timeout(client._timeout or 5.0):
            await call.write(request)
            response = await call.read()
    except aetcd.rpc.AioRpcError as exc:
        call.cancel()
        _raise_mapped(exc)
    except BaseException:
        call.cancel()
        raise
    if response is EOF:
        call.cancel()
        raise ConnectionFailedError("the etcd watch stream ended before the watch was created")
    if response.compact_revision:
        call.cancel()
        raise RevisionCompactedError(response.compact_revision)
    if not response.created or response.canceled:
        call.cancel()
        raise ClientError(f"etcd refused the watch: {response.cancel_reason or 'not created'}")
    return WatchStream(call)
