"""The link records of the nodes streaming to one replica: written on change, in batches.

Contract:

- :meth:`RecordWriter.write_now` writes one node's record at once (a stream's first record,
  before its Welcome): the caller awaits etcd's answer.
- :meth:`RecordWriter.mark` says a node's record may have changed. One writer task (per
  replica, not per stream: 10,000 streams cost one task) takes the marked nodes in the order
  they were marked and writes those whose record differs from what this replica last wrote, up
  to :data:`~meshserve.controlplane.registry.TXN_OPS` records per etcd transaction, one
  transaction at a time: several nodes reporting at once cost one write, and a rewrite of every
  record (:meth:`rewrite_all`, after the replica's lease was renewed) goes out at the pace etcd
  answers, never as 10,000 concurrent puts.
- A record is written only while its stream is the node's live one (``live``); a batch that
  fails is retried (its nodes marked again) after :data:`RETRY_S`, logged once per failure streak.
- :meth:`delete` deletes a node's record once its stream ended, batched the same way (up to
  ``TXN_OPS`` deletes per transaction, deletes before writes): 10,000 streams cut at once are
  100 transactions, not 10,000 concurrent deletes crowding out the replica's own lease
  keep-alive. A failed batch is retried; the caller bounds its own wait.
- :meth:`settled` waits until no batch in flight names the node: the stream's cleanup awaits
  it before deleting the record, so a batch cannot write a record back after its delete; a
  new stream's :meth:`write_now` withdraws a delete still queued for the node (and waits for
  one in flight), so an old stream's delete never removes the new stream's record.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from meshserve.controlplane.registry import TXN_OPS, Registry
from meshserve.protos import mesh_pb2

__all__ = ["RETRY_S", "RecordWriter", "link_record"]

_log = logging.getLogger("meshserve.controlplane.hub")

RETRY_S = 0.5  # pause after a failed batch before its records are tried again


def link_record(info: mesh_pb2.NodeInfo) -> mesh_pb2.NodeInfo:
    """What of a node's record goes to etcd: all of it but download progress (``bytes_fetched``
    of a LOADING copy), which changes every half second and is read from the live stream."""
    out = mesh_pb2.NodeInfo()
    out.CopyFrom(info)
    for copy in out.copies:
        copy.ClearField("bytes_fetched")
    return out


class _Recorded(Protocol):
    """What a record writer needs of a stream: its node id and its record (``NodeSession``)."""

    @property
    def node_id(self) -> str: ...

    def record(self) -> mesh_pb2.NodeInfo: ...


class RecordWriter:
    """One replica's link-record writes (see the module contract)."""

    def __init__(
        self,
        registry: Registry,
        replica_id: str,
        lease_id: Callable[[], int],
        live: Mapping[str, object],
    ) -> None:
        """``live``: the node id -> stream mapping of the streams alive now (the hub's
        sessions); a marked stream no longer in it is not written."""
        self._registry = registry
        self._replica_id = replica_id
        self._lease_id = lease_id
        self._live = live
        self._dirty: dict[str, _Recorded] = {}
        self._written: dict[str, tuple[object, bytes]] = {}  # the last record per node
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: frozenset[str] = frozenset()
        self._flushed = asyncio.Event()  # set while no batch is in flight
        self._flushed.set()
        self._deletes: dict[str, asyncio.Future[None]] = {}  # queued deletes, by node id
        self.batches = 0  # transactions written (a figure for benches and tests)

    async def write_now(self, stream: _Recorded) -> None:
        """Write ``stream``'s record now (see the module contract)."""
        self._dirty.pop(stream.node_id, None)
        queued = self._deletes.pop(stream.node_id, None)
        if queued is not None and not queued.done():
            queued.set_result(None)  # withdrawn: the node is back
        await self.settled(stream.node_id)
        record = link_record(stream.record())
        data = record.SerializeToString(deterministic=True)
        await self._registry.put_node_records(self._replica_id, [record], self._lease_id())
        self._written[stream.node_id] = (stream, data)

    def mark(self, stream: _Recorded) -> None:
        """``stream``'s record may have changed: written by the next batch if it did."""
        self._dirty[stream.node_id] = stream
        self._kick()

    async def delete(self, node_id: str) -> None:
        """Delete ``node_id``'s record (its stream here ended; see the module contract);
        returns once etcd confirmed, or once a new stream of the node withdrew it."""
        future = self._deletes.get(node_id)
        if future is None:
            future = self._deletes[node_id] = asyncio.get_running_loop().create_future()
        self._kick()
        await asyncio.shield(future)

    def _kick(self) -> None:
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    def rewrite_all(self, streams: Mapping[str, _Recorded]) -> None:
        """Write every record in ``streams`` again, changed or not (the lease was renewed)."""
        self._written.clear()
        for stream in streams.values():
            self.mark(stream)

    def forget(self, stream: _Recorded) -> None:
        """``stream`` ended: nothing more is written for it."""
        if self._dirty.get(stream.node_id) is stream:
            del self._dirty[stream.node_id]
        if self._written.get(stream.node_id, (None,))[0] is stream:
            del self._written[stream.node_id]

    async def settled(self, node_id: str) -> None:
        """Return once no batch in flight names ``node_id``."""
        while node_id in self._in_flight:
            await self._flushed.wait()

    async def close(self) -> None:
        """Stop the writer (records not written yet expire with the replica's lease)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._deletes or self._dirty:
                if self._deletes:
                    ok = await self._delete_batch(failures)
                else:
                    batch = self._batch()
                    if not batch:
                        continue
                    ok = await self._write_batch(batch, failures)
                if not ok:
                    failures += 1
                    await asyncio.sleep(RETRY_S)
                elif failures:
                    _log.info("node records written again after %d failed attempts", failures)
                    failures = 0

    async def _write_batch(
        self, batch: list[tuple[_Recorded, mesh_pb2.NodeInfo, bytes]], failures: int
    ) -> bool:
        self._in_flight = frozenset(stream.node_id for stream, _, _ in batch)
        self._flushed.clear()
        try:
            await self._registry.put_node_records(
                self._replica_id, [record for _, record, _ in batch], self._lease_id()
            )
        except Exception as exc:
            if failures == 0:
                _log.warning("writing %d node records failed: %r; retrying", len(batch), exc)
            for stream, _, _ in batch:
                self._dirty.setdefault(stream.node_id, stream)
            return False
        finally:
            self._in_flight = frozenset()
            self._flushed.set()
        self.batches += 1
        for stream, _, data in batch:
            self._written[stream.node_id] = (stream, data)
        return True

    async def _delete_batch(self, failures: int) -> bool:
        node_ids = list(itertools.islice(self._deletes, TXN_OPS))
        self._in_flight = frozenset(node_ids)
        self._flushed.clear()
        try:
            await self._registry.delete_node_records(self._replica_id, node_ids)
        except Exception as exc:
            if failures == 0:
                _log.warning("deleting %d node records failed: %r; retrying", len(node_ids), exc)
            return False  # still queued (those not withdrawn meanwhile)
        finally:
            self._in_flight = frozenset()
            self._flushed.set()
        self.batches += 1
        for node_id in node_ids:
            future = self._deletes.pop(node_id, None)
            if future is not None and not future.done():
                future.set_result(None)
        return True

    def _batch(self) -> list[tuple[_Recorded, mesh_pb2.NodeInfo, bytes]]:
        """Up to TXN_OPS marked records that changed, oldest mark first."""
        out: list[tuple[_Recorded, mesh_pb2.NodeInfo, bytes]] = []
        while self._dirty and len(out) < TXN_OPS:
            node_id = next(iter(self._dirty))
            stream = self._dirty.pop(node_id)
            if self._live.get(node_id) is not stream:
                continue  # ended: its cleanup deletes the record
            record = link_record(stream.record())
            data = record.SerializeToString(deterministic=True)
            if self._written.get(node_id) == (stream, data):
                continue
            out.append((stream, record, data))
        return out
