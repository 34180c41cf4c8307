"""A stream's bounded send queue, with a writer task only while messages wait.

Contract:

- :meth:`Outbox.put_nowait` queues a message or raises :class:`asyncio.QueueFull` when
  ``size`` messages wait (never blocks; the caller maps it to RESOURCE_EXHAUSTED).
- Once :meth:`Outbox.attach` gave it the stream's write, messages go out in the order they were
  queued, one write at a time, by a task that exists only while there is something to write: an
  idle stream -- most of 10,000 linked nodes, most of the time -- holds no task, no future and
  no coroutine frame for sending (what an ``asyncio.Queue`` read by a per-stream loop costs).
  Messages queued before :meth:`attach` wait for it.
- ``merge`` (given to :meth:`attach`): takes one or more messages from the front of the queue
  and returns the one message to write for them (several tunneled queries in one message: under
  load one write carries many, where a message each costs a write each). Without it, one
  message per write.
- A write that fails ends the sending for good (the stream is broken; its read loop ends too):
  the rest stay queued and are dropped with the outbox. :meth:`close` cancels a write in flight
  and awaits it.
- ``get_nowait`` / ``empty`` / ``qsize`` read the queue as ``asyncio.Queue`` does (tests and
  benches look at what a stream was sent without a stream).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeAlias, TypeVar

__all__ = ["Outbox"]

_log = logging.getLogger("meshserve.controlplane.hub")

T = TypeVar("T")

#: Takes one or more messages from the front of the queue (never none) and returns the message
#: that carries them.
Merge: TypeAlias = Callable[[deque[T]], T]


class Outbox(Generic[T]):
    """One stream's send queue (see the module contract)."""

    __slots__ = ("_broken", "_items", "_merge", "_size", "_task", "_write")

    def __init__(self, size: int) -> None:
        self._items: deque[T] = deque()
        self._size = size
        self._write: Callable[[T], Awaitable[None]] | None = None
        self._merge: Merge[T] | None = None
        self._task: asyncio.Task[None] | None = None
        self._broken = False

    def put_nowait(self, item: T) -> None:
        if self._size > 0 and len(self._items) >= self._size:
            raise asyncio.QueueFull
        self._items.append(item)
        self._kick()

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    def attach(self, write: Callable[[T], Awaitable[None]], merge: Merge[T] | None = None) -> None:
        """Send through ``write`` from now on (the stream is set up), ``merge`` taking what
        each write carries (None: one message)."""
        self._write = write
        self._merge = merge
        self._kick()

    async def close(self) -> None:
        """Stop sending: a write in flight is cancelled and awaited."""
        self._broken = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _kick(self) -> None:
        if self._write is None or self._broken or not self._items:
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(self._write))

    async def _drain(self, write: Callable[[T], Awaitable[None]]) -> None:
        items, merge = self._items, self._merge
        try:
            while items and not self._broken:
                await write(items.popleft() if merge is None else merge(items))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: its read loop ends and cleans up
            self._broken = True
            _log.debug("stream write failed: %r; sending stopped", exc)
        finally:
            if self._task is asyncio.current_task():
                self._task = None
