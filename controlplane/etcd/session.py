"""A lease kept alive in the background: the liveness anchor of one participant.

Keys written with ``lease=session.lease_id`` live exactly as long as the session:
they vanish when it is closed (revoked) or when the process stops refreshing and the
TTL runs out.  :attr:`Session.done` tells the owner that the guarantee is gone.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Self

from meshserve.controlplane.etcd import _client
from meshserve.controlplane.etcd._client import EtcdClient

__all__ = ["Session", "SessionLostError"]

log = logging.getLogger(__name__)

#: Upper bound for one revoke RPC in :meth:`Session.close` (etcd may be down).
_REVOKE_TIMEOUT_S = 2.0
#: Upper bound for the pause between failed keep-alive attempts.
_MAX_RETRY_DELAY_S = 0.5


class SessionLostError(RuntimeError):
    """Raised by operations that need a live session once its lease is lost/closed."""


class Session:
    """Owns one etcd lease and the task that keeps it alive.

    Contract:

    * :meth:`open` grants a lease of (at least) ``ttl`` seconds and starts a keep-alive
      loop that refreshes it every ``ttl / 3`` seconds;
    * a refresh that fails (etcd down, timeout, ...) is logged at WARNING and retried
      (every <= 0.5 s) -- it is not fatal while the lease's deadline (the time the last
      successful refresh was *sent* plus the TTL it returned) has not passed;
    * :attr:`done` is set once the session no longer guarantees the lease: a refresh
      answered TTL <= 0 (lease revoked/expired in etcd), the deadline passed without a
      successful refresh, or :meth:`close` was called.  :attr:`lost` distinguishes the
      first two cases from a deliberate close.  Once set it stays set; the session is
      not reusable;
    * :meth:`close` cancels and awaits the keep-alive task, then (``revoke=True``)
      revokes the lease so its keys disappear now -- also after a loss, since a lease
      that outlived an etcd outage may still exist; errors (etcd unreachable, lease
      already gone) are ignored and the keys then expire by TTL.  Idempotent.
    """

    def __init__(self, client: EtcdClient, lease_id: int, ttl: int) -> None:
        """Wrap an already granted lease; prefer :meth:`open`, which also starts the
        keep-alive loop (a session built directly has none until :meth:`_start`)."""
        self._client = client
        self._lease_id = lease_id
        self._ttl = ttl
        self._done = asyncio.Event()
        self._lost = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, client: EtcdClient, ttl: int) -> Session:
        """Grant a lease of ``ttl`` seconds (etcd may round it up) and keep it alive.

        :raises ValueError: ``ttl < 1``.
        :raises aetcd.exceptions.ClientError: the lease could not be granted.
        """
        if ttl < 1:
            raise ValueError(f"ttl must be >= 1 second, got {ttl}")
        loop = asyncio.get_running_loop()
        granted_at = loop.time()
        lease_id, granted_ttl = await _client.grant_lease(client, ttl)
        session = cls(client, lease_id, granted_ttl)
        session._start(deadline=granted_at + granted_ttl)
        log.debug("session opened: lease %x ttl %ss", lease_id, granted_ttl)
        return session

    def _start(self, deadline: float) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._keepalive(deadline), name=f"etcd-session-keepalive-{self._lease_id:x}"
        )

    # -- state ---------------------------------------------------------------------

    @property
    def lease_id(self) -> int:
        """The etcd lease ID to attach keys to."""
        return self._lease_id

    @property
    def ttl(self) -> int:
        """The TTL granted by etcd, in seconds."""
        return self._ttl

    @property
    def done(self) -> asyncio.Event:
        """Set once the lease is lost or the session was closed (never cleared)."""
        return self._done

    @property
    def lost(self) -> bool:
        """True when :attr:`done` was set because the lease was lost, not by :meth:`close`."""
        return self._lost

    # -- keep-alive ----------------------------------------------------------------

    async def _keepalive(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        interval = self._ttl / 3
        delay = interval
        try:
            while True:
                await asyncio.sleep(delay)
                sent = loop.time()
                remaining = deadline - sent
                if remaining <= 0:
                    self._mark_lost("no successful refresh before the TTL ran out")
                    return
                try:
                    ttl = await asyncio.wait_for(
                        _client.refresh_lease(self._client, self._lease_id),
                        timeout=max(0.05, min(remaining, interval)),
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # transient by contract until the deadline
                    ttl = None
                    log.warning(
                        "lease %x: keep-alive failed (%s: %s); %.1fs left before it may expire",
                        self._lease_id,
                        type(exc).__name__,
                        exc,
                        deadline - loop.time(),
                    )
                if ttl is None:
                    retry = _client.jittered(min(interval, _MAX_RETRY_DELAY_S))
                    delay = min(retry, max(0.0, deadline - loop.time()))
                    continue
                if ttl <= 0:
                    self._mark_lost("etcd reports the lease gone (TTL <= 0)")
                    return
                deadline = sent + ttl
                delay = max(0.0, interval - (loop.time() - sent))
        finally:
            self._done.set()

    def _mark_lost(self, why: str) -> None:
        if not self._closed:
            self._lost = True
            log.warning("lease %x lost: %s", self._lease_id, why)

    # -- shutdown ------------------------------------------------------------------

    async def close(self, revoke: bool = True) -> None:
        """Stop the keep-alive (awaited) and, if ``revoke``, revoke the lease.

        Revocation errors (etcd down, lease already gone) are logged and ignored.
        Sets :attr:`done`. Safe to call more than once.
        """
        already_closed = self._closed
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        if revoke and not already_closed:
            try:
                await asyncio.wait_for(
                    _client.revoke_lease(self._client, self._lease_id), _REVOKE_TIMEOUT_S
                )
            except Exception as exc:
                log.info(
                    "lease %x: revoke failed, ignored (%s: %s)",
                    self._lease_id,
                    type(exc).__name__,
                    exc,
                )
        self._done.set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "lost" if self._lost else "closed" if self._closed else "live"
        return f"Session(lease={self._lease_id:x}, ttl={self._ttl}, {state})"
