"""An in-memory mirror of every key under an etcd prefix, kept in sync by a watch."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from itertools import islice
from types import MappingProxyType, TracebackType
from typing import Self

from meshserve.controlplane.etcd import _client
from meshserve.controlplane.etcd._client import EtcdClient, WatchEvent

__all__ = ["JOURNAL", "PrefixMirror"]

log = logging.getLogger(__name__)

JOURNAL = 65536  # changed keys remembered for changes_since


class PrefixMirror:
    """Keeps ``{key: value}`` for every key under ``prefix`` in sync with etcd.

    Contract:

    * :meth:`start` reads the prefix (remembering the store revision of that read) and
      returns once that initial load is in place; it then watches from
      ``revision + 1`` in a background task.  Errors of the initial read propagate;
    * every watch event is applied in revision order and :attr:`revision` advances to
      the last applied revision (or the revision of the last full read);
    * when the watch breaks (etcd restarted, connection refused, timeouts, any other
      client error) it is re-created with exponential backoff (``initial_backoff``
      doubling up to ``max_backoff``, 2 s by default; each pause jittered to 50-100 %)
      *from the last applied revision + 1*, so no event is lost or applied twice;
    * when that revision has been compacted, the prefix is read again in full (keys
      deleted meanwhile disappear) and subscribers are notified;
    * subscribers (:meth:`subscribe`) are called synchronously, in the event loop, once
      after each applied batch of events (all events available at that moment -- a
      transaction's events are never split) and after each full reload.  Callbacks
      must not block; exceptions they raise are logged and ignored;
    * :meth:`changes_since` names the keys changed after a cursor it returned earlier (a
      bounded journal of the last :data:`JOURNAL` changes), or None when it cannot: the
      cursor is older than the journal, or the prefix was read again in full since;
    * keys are the full etcd keys decoded as UTF-8 (undecodable bytes are kept via
      ``surrogateescape``); values are the raw bytes;
    * close the mirror before closing the client; :meth:`close` cancels and awaits the
      background task.
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        *,
        initial_backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._prefix_b = prefix.encode()
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._data: dict[str, bytes] = {}
        self._mod_revisions: dict[str, int] = {}
        self._revision = 0
        self._subscribers: list[Callable[[], None]] = []
        self._notify_pending = False
        self._task: asyncio.Task[None] | None = None
        self._watching = False
        self._reloads = 0
        self._reconnects = 0
        self._seq = 0  # changes applied (a full read counts as one)
        self._journal: deque[str] = deque(maxlen=JOURNAL)  # keys of the newest changes
        self._floor = 0  # the cursor the journal reaches back to

    # -- read side -----------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """The mirrored key prefix."""
        return self._prefix

    @property
    def revision(self) -> int:
        """The etcd revision the mirror reflects (0 before :meth:`start`)."""
        return self._revision

    @property
    def watching(self) -> bool:
        """True while a watch stream is established (False while reconnecting)."""
        return self._watching

    @property
    def reloads(self) -> int:
        """How many full reloads happened after a compaction (diagnostics)."""
        return self._reloads

    @property
    def reconnects(self) -> int:
        """How many times the watch was re-created after it broke or ended (diagnostics)."""
        return self._reconnects

    def items(self) -> Mapping[str, bytes]:
        """A read-only snapshot of the mirrored keys (later changes do not show in it)."""
        return MappingProxyType(dict(self._data))

    def mod_revisions(self) -> Mapping[str, int]:
        """A read-only copy of each key's etcd ``mod_revision``."""
        return MappingProxyType(dict(self._mod_revisions))

    def changes_since(self, cursor: int) -> tuple[int, frozenset[str] | None]:
        """``(new cursor, keys changed after cursor)``; the keys are None when the journal does
        not reach back that far or the prefix was read in full since (read all of it). Pass
        -1 for a first call."""
        if cursor < self._floor:
            return self._seq, None
        n = self._seq - cursor
        if n == 0:
            return self._seq, frozenset()
        return self._seq, frozenset(islice(self._journal, len(self._journal) - n, None))

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after each applied batch/reload; returns an unsubscribe
        function (idempotent)."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    async def wait_for(
        self,
        predicate: Callable[[Mapping[str, bytes]], bool],
        timeout: float,
    ) -> Mapping[str, bytes]:
        """Wait until ``predicate(items())`` holds; returns that snapshot.

        :raises TimeoutError: not satisfied within ``timeout`` seconds.
        """
        changed = asyncio.Event()
        unsubscribe = self.subscribe(changed.set)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed.clear()
                    snapshot = self.items()
                    if predicate(snapshot):
                        return snapshot
                    await changed.wait()
        finally:
            unsubscribe()

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load the prefix, then keep it in sync in the background.

        :raises RuntimeError: already started.
        :raises aetcd.exceptions.ClientError: the initial read failed.
        """
        if self._task is not None:
            raise RuntimeError("PrefixMirror already started")
        await self._load()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"etcd-mirror-{self._prefix}"
        )

    async def reload(self) -> None:
        """Forget everything, read the prefix again from scratch and watch from there.

        For a store that was replaced (:func:`~meshserve.controlplane.etcd.guard.store_replaced`):
        its revisions restart lower, so the running watch, waiting for revisions after the old
        one, would never deliver. Subscribers are notified once, with the new content.

        :raises RuntimeError: not started (or closed).
        :raises aetcd.exceptions.ClientError: the read failed (the old watch is stopped; call
            again).
        """
        if self._task is None:
            raise RuntimeError("PrefixMirror not started")
        task = self._task
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        self._watching = False
        await self._load()
        self._reloads += 1
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"etcd-mirror-{self._prefix}"
        )
        log.warning(
            "PrefixMirror(%s): reloaded from scratch at revision %d", self._prefix, self._revision
        )

    async def close(self) -> None:
        """Stop watching; cancels and awaits the background task. Idempotent."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        self._watching = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals -----------------------------------------------------------------

    def _decode(self, key: bytes) -> str:
        return key.decode("utf-8", errors="surrogateescape")

    async def _load(self) -> None:
        revision, kvs = await _client.get_prefix(self._client, self._prefix_b)
        self._data = {self._decode(kv.key): kv.value for kv in kvs}
        self._mod_revisions = {self._decode(kv.key): kv.mod_revision for kv in kvs}
        self._revision = revision
        self._seq += 1
        self._journal.clear()
        self._floor = self._seq
        self._schedule_notify()

    def _apply(self, event: WatchEvent) -> None:
        key = self._decode(event.kv.key)
        if event.kind == "PUT":
            self._data[key] = event.kv.value
            self._mod_revisions[key] = event.kv.mod_revision
        else:
            self._data.pop(key, None)
            self._mod_revisions.pop(key, None)
        if event.kv.mod_revision > self._revision:
            self._revision = event.kv.mod_revision
        self._seq += 1
        if len(self._journal) == JOURNAL:
            self._floor += 1
        self._journal.append(key)
        self._schedule_notify()

    def _schedule_notify(self) -> None:
        # Coalesce: events that arrive together (without the watch task yielding) are
        # one batch; subscribers run once the task next yields to the loop.
        if not self._notify_pending:
            self._notify_pending = True
            asyncio.get_running_loop().call_soon(self._notify)

    def _notify(self) -> None:
        self._notify_pending = False
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                log.exception("PrefixMirror(%s): subscriber %r failed", self._prefix, callback)

    async def _run(self) -> None:
        backoff = self._initial_backoff
        needs_reload = False
        first = True
        while True:
            stream: _client.WatchStream | None = None
            try:
                if needs_reload:
                    await self._load()
                    self._reloads += 1
                    needs_reload = False
                    log.info(
                        "PrefixMirror(%s): reloaded at revision %d", self._prefix, self._revision
                    )
                stream = await _client.watch(
                    self._client, self._prefix_b, start_revision=self._revision + 1, prefix=True
                )
                self._watching = True
                if not first:
                    self._reconnects += 1
                first = False
                async for event in stream:
                    self._apply(event)
                    backoff = self._initial_backoff  # the stream works: reset
                if _client.client_closed(self._client):
                    log.info("PrefixMirror(%s): client closed, stopping", self._prefix)
                    return
                log.info("PrefixMirror(%s): watch ended, re-creating", self._prefix)
            except asyncio.CancelledError:
                raise
            except _client.RevisionCompactedError as exc:
                log.warning(
                    "PrefixMirror(%s): revision %d compacted (%s); reloading",
                    self._prefix,
                    self._revision + 1,
                    exc,
                )
                needs_reload = True
                continue
            except Exception as exc:
                log.warning(
                    "PrefixMirror(%s): watch failed at revision %d (%s: %s); retrying in %.2fs",
                    self._prefix,
                    self._revision,
                    type(exc).__name__,
                    exc,
                    backoff,
                )
            finally:
                self._watching = False
                if stream is not None:
                    await stream.cancel()
            await asyncio.sleep(_client.jittered(backoff))
            backoff = min(backoff * 2, self._max_backoff)

    def __repr__(self) -> str:
        return (
            f"PrefixMirror({self._prefix!r}, keys={len(self._data)}, rev={self._revision}, "
            f"watching={self._watching})"
        )
