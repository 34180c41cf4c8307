"""Leader election on one etcd key, tied to a :class:`~meshserve.controlplane.etcd.session.Session`.

The leader is whoever holds ``key``; the key is attached to the leader's session
lease, so leadership ends when that session is closed, or when its process stops
refreshing and the TTL runs out.
"""

from __future__ import annotations

import asyncio
import logging

from meshserve.controlplane.etcd import _client
from meshserve.controlplane.etcd._client import EtcdClient
from meshserve.controlplane.etcd.session import Session, SessionLostError

__all__ = ["Election"]

log = logging.getLogger(__name__)

_CLEANUP_TIMEOUT_S = 2.0
_MAX_BACKOFF_S = 1.0


class Election:
    """One participant in the election on ``key``, announcing ``value`` when leading.

    Contract:

    * :meth:`campaign` returns once this participant holds ``key`` (created by a
      create-if-absent transaction with the session's lease).  While another holder
      exists it watches the key and retries after the key is deleted.  Transient etcd
      errors are retried with backoff.  It raises :class:`SessionLostError` if the
      session ends (``session.done``) before election.  If the key already holds this
      participant's value under this session's lease (e.g. a previous attempt whose
      answer was lost), that counts as elected;
    * a cancelled :meth:`campaign` leaves nothing behind: a create transaction in
      flight is allowed to finish (bounded by 2 s) and, if it created the key, the key
      is deleted again; if its outcome cannot be learnt, the key is deleted if it
      holds this participant's value under this session's lease;
    * :attr:`is_leader` is True from a successful :meth:`campaign` until :meth:`resign`
      or until the session is done (closed or lease lost) -- whichever comes first;
    * :meth:`resign` deletes the key only if it is still this term's (same value and
      same create revision), then ``is_leader`` is False.  Errors propagate (the key
      then expires with the lease);
    * one :class:`Election` object runs one campaign at a time.
    """

    def __init__(self, client: EtcdClient, session: Session, key: str, value: str) -> None:
        self._client = client
        self._session = session
        self._key = key
        self._key_b = key.encode()
        self._value = value
        self._value_b = value.encode()
        self._elected = False
        self._create_revision = 0

    @property
    def key(self) -> str:
        """The election key."""
        return self._key

    @property
    def value(self) -> str:
        """What this participant writes to the key when it leads."""
        return self._value

    @property
    def session(self) -> Session:
        """The session whose lease backs the leadership."""
        return self._session

    @property
    def is_leader(self) -> bool:
        """True while elected, not resigned, and the session is not done."""
        return self._elected and not self._session.done.is_set()

    @property
    def revision(self) -> int:
        """Create revision of the key in the current term (0 when not leading); a
        fencing token that grows with every new term."""
        return self._create_revision if self.is_leader else 0

    async def leader(self) -> str | None:
        """The current leader's value, or ``None`` when nobody leads."""
        kv = await _client.get(self._client, self._key_b)
        return None if kv is None else kv.value.decode("utf-8", errors="replace")

    async def campaign(self) -> None:
        """Block until this participant is the leader (see the class contract).

        :raises SessionLostError: the session ended before this participant was elected.
        """
        if self.is_leader:
            return
        try:
            await self._campaign()
        except BaseException:
            if not self._elected:
                await self._cleanup()
            raise

    async def _campaign(self) -> None:
        backoff = 0.05
        while True:
            if self._session.done.is_set():
                raise SessionLostError(f"session ended while campaigning for {self._key!r}")
            try:
                created, revision, existing = await self._create_if_absent()
            except _client.TRANSIENT_ERRORS as exc:
                log.warning("campaign %s: %s: %s; retrying", self._key, type(exc).__name__, exc)
                await asyncio.sleep(_client.jittered(backoff))
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            if created:
                self._won(revision)
                return
            if existing is None:
                continue
            if existing.lease == self._session.lease_id and existing.value == self._value_b:
                self._won(existing.create_revision)
                return
            log.debug("campaign %s: held by %r, waiting", self._key, existing.value)
            if await self._wait_for_vacancy(revision + 1):
                backoff = 0.05
            else:
                await asyncio.sleep(_client.jittered(backoff))
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _create_if_absent(self) -> tuple[bool, int, _client.KeyValue | None]:
        """The create transaction, shielded from cancellation so its outcome is known:
        if the caller is cancelled meanwhile, wait (bounded) for the answer and delete
        the key again if the transaction created it, then re-raise the cancellation."""
        txn = asyncio.ensure_future(
            _client.create_if_absent(
                self._client, self._key_b, self._value_b, self._session.lease_id
            )
        )
        try:
            return await asyncio.shield(txn)
        except asyncio.CancelledError:
            try:
                async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                    created, revision, _ = await txn
                    if created:
                        await _client.delete_if(self._client, self._key_b, create_revision=revision)
                        log.info("campaign %s cancelled: removed the key it created", self._key)
            except Exception as exc:  # outcome unknown: campaign()'s fallback cleanup runs
                log.debug("campaign %s cancelled mid-transaction: %r", self._key, exc)
                if not txn.done():
                    txn.cancel()
            raise

    def _won(self, create_revision: int) -> None:
        self._create_revision = create_revision
        self._elected = True
        log.info("elected on %s (revision %d) as %r", self._key, create_revision, self._value)

    async def _wait_for_vacancy(self, start_revision: int) -> bool:
        """Wait until the key is deleted at or after ``start_revision``.

        Returns True when a deletion was seen, False when the watch failed (retry).
        :raises SessionLostError: the session ended meanwhile.
        """
        waiter = asyncio.ensure_future(self._until_deleted(start_revision))
        lost = asyncio.ensure_future(self._session.done.wait())
        try:
            await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, lost):
                task.cancel()
            await asyncio.wait({waiter, lost})
        if lost.done() and not lost.cancelled():
            raise SessionLostError(f"session ended while campaigning for {self._key!r}")
        if waiter.cancelled():
            return False
        exc = waiter.exception()
        if exc is not None:
            if not isinstance(exc, Exception):
                raise exc
            log.warning("campaign %s: watch failed (%s: %s)", self._key, type(exc).__name__, exc)
            return False
        deleted = waiter.result()
        if not deleted and _client.client_closed(self._client):
            raise RuntimeError("etcd client closed while campaigning")
        return deleted

    async def _until_deleted(self, start_revision: int) -> bool:
        stream = await _client.watch(self._client, self._key_b, start_revision=start_revision)
        try:
            async for event in stream:
                if event.kind == "DELETE":
                    return True
            return False
        finally:
            await stream.cancel()

    async def _cleanup(self) -> None:
        """Delete the key if a possibly-applied transaction of ours created it."""
        try:
            async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                kv = await _client.get(self._client, self._key_b)
                if (
                    kv is not None
                    and kv.lease == self._session.lease_id
                    and kv.value == self._value_b
                ):
                    await _client.delete_if(self._client, self._key_b, mod_revision=kv.mod_revision)
                    log.info("campaign %s abandoned: removed our key", self._key)
        except Exception as exc:
            log.warning(
                "campaign %s abandoned: cleanup failed (%s: %s); key expires with the lease",
                self._key,
                type(exc).__name__,
                exc,
            )

    async def resign(self) -> None:
        """Give up leadership: delete the key iff it is still this term's.

        No-op when not elected.  ``is_leader`` is False afterwards even if etcd could
        not be reached (the error propagates; the key then expires with the lease).
        """
        if not self._elected:
            return
        self._elected = False
        revision, self._create_revision = self._create_revision, 0
        await _client.delete_if(
            self._client, self._key_b, value=self._value_b, create_revision=revision
        )

    def __repr__(self) -> str:
        state = "leader" if self.is_leader else "follower"
        return f"Election({self._key!r}, {self._value!r}, {state})"
