"""The link-record writer (controlplane/link/records.py): on change only, batched, never a
record written back after its stream ended."""

from __future__ import annotations

import asyncio

import pytest

from meshserve.controlplane import keys
from meshserve.controlplane.link.records import RecordWriter
from meshserve.controlplane.registry import TXN_OPS
from meshserve.protos import mesh_pb2
from tests.support.fake_registry import FakeRegistry


class _Stream:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.state = mesh_pb2.LOADING

    def record(self) -> mesh_pb2.NodeInfo:
        copy = mesh_pb2.CopyStatus(model="m", variant="v", state=self.state, bytes_fetched=7)
        return mesh_pb2.NodeInfo(node_id=self.node_id, replicas=["cp-1"], copies=[copy])


async def _idle(writer: RecordWriter) -> None:
    for _ in range(100):
        await asyncio.sleep(0)
    for stream_id in list(writer._in_flight):
        await writer.settled(stream_id)


@pytest.mark.asyncio
async def test_records_that_change_together_go_out_in_one_transaction_each_txn_ops() -> None:
    registry = FakeRegistry()
    live: dict[str, _Stream] = {f"n{i}": _Stream(f"n{i}") for i in range(TXN_OPS * 2 + 50)}
    writer = RecordWriter(registry, "cp-1", lambda: 42, live)
    before = registry.revision
    for stream in live.values():
        writer.mark(stream)
    await _idle(writer)
    assert registry.revision - before == 3  # 250 records: 3 transactions, not 250 puts
    assert writer.batches == 3
    stored = registry.data[keys.node_link_key("n7", "cp-1")]
    assert stored.lease == 42
    info = keys.decode(stored.value, mesh_pb2.NodeInfo())
    assert info.copies[0].bytes_fetched == 0  # download progress stays on the stream

    # marked again without a change: nothing written
    for stream in live.values():
        writer.mark(stream)
    await _idle(writer)
    assert registry.revision - before == 3

    # one changed: one write, of that one
    live["n3"].state = mesh_pb2.READY
    for stream in live.values():
        writer.mark(stream)
    await _idle(writer)
    assert registry.revision - before == 4
    assert registry.data[keys.node_link_key("n3", "cp-1")].mod_revision == registry.revision
    assert registry.data[keys.node_link_key("n4", "cp-1")].mod_revision < registry.revision

    # a rewrite of all (the lease was renewed) writes every record, in batches
    writer.rewrite_all(live)
    await _idle(writer)
    assert registry.revision - before == 7
    await writer.close()


@pytest.mark.asyncio
async def test_a_stream_that_ended_is_not_written() -> None:
    registry = FakeRegistry()
    gone = _Stream("gone")
    live: dict[str, _Stream] = {"kept": _Stream("kept")}
    writer = RecordWriter(registry, "cp-1", lambda: 1, live)
    writer.mark(gone)  # not (or no longer) the node's live stream
    writer.mark(live["kept"])
    writer.forget(live["kept"])  # ended before the batch ran
    await _idle(writer)
    assert not any(k.startswith(keys.NODES) for k in registry.data)
    await writer.close()


@pytest.mark.asyncio
async def test_settled_waits_for_the_batch_in_flight_and_a_failed_batch_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = FakeRegistry()
    stream = _Stream("n1")
    live = {"n1": stream}
    writer = RecordWriter(registry, "cp-1", lambda: 1, live)
    release = asyncio.Event()
    calls = 0
    real = registry.put_node_records

    async def slow(replica_id: str, infos: list[mesh_pb2.NodeInfo], lease: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("etcd away")
        await release.wait()
        await real(replica_id, infos, lease)

    monkeypatch.setattr(registry, "put_node_records", slow)
    monkeypatch.setattr("meshserve.controlplane.link.records.RETRY_S", 0.01)
    writer.mark(stream)
    for _ in range(200):  # the retry is in flight, held
        await asyncio.sleep(0.005)
        if calls == 2:
            break
    assert calls == 2
    settled = asyncio.ensure_future(writer.settled("n1"))
    await asyncio.sleep(0.02)
    assert not settled.done()  # a delete now could be overtaken by the write
    release.set()
    await asyncio.wait_for(settled, 2)
    assert keys.node_link_key("n1", "cp-1") in registry.data
    await writer.close()


@pytest.mark.asyncio
async def test_deletes_of_streams_that_ended_together_are_batched() -> None:
    registry = FakeRegistry()
    live: dict[str, _Stream] = {f"n{i}": _Stream(f"n{i}") for i in range(TXN_OPS + 30)}
    writer = RecordWriter(registry, "cp-1", lambda: 1, live)
    for stream in live.values():
        writer.mark(stream)
    await _idle(writer)
    before = registry.revision
    gone = dict(live)
    live.clear()  # every stream cut at once
    for stream in gone.values():
        writer.forget(stream)
    await asyncio.wait_for(asyncio.gather(*(writer.delete(n) for n in gone)), 5)
    assert registry.revision - before == 2  # 130 deletes: 2 transactions
    assert not any(k.startswith(keys.NODES) for k in registry.data)
    await writer.close()


@pytest.mark.asyncio
async def test_a_new_stream_withdraws_the_queued_delete_of_its_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = FakeRegistry()
    old = _Stream("n1")
    live: dict[str, _Stream] = {"n1": old}
    writer = RecordWriter(registry, "cp-1", lambda: 1, live)
    await writer.write_now(old)
    live.clear()
    real = registry.delete_node_records
    calls = 0

    async def failing(replica_id: str, node_ids: list[str]) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("etcd away")

    monkeypatch.setattr(registry, "delete_node_records", failing)
    monkeypatch.setattr("meshserve.controlplane.link.records.RETRY_S", 0.01)
    cleanup = asyncio.ensure_future(writer.delete("n1"))  # the old stream's cleanup
    for _ in range(100):
        await asyncio.sleep(0.005)
        if calls >= 2:
            break
    assert calls >= 2 and not cleanup.done()  # queued, retried
    new = _Stream("n1")
    new.state = mesh_pb2.READY
    live["n1"] = new
    await asyncio.wait_for(writer.write_now(new), 2)  # the node is back
    await asyncio.wait_for(cleanup, 2)  # the old delete was withdrawn, not run
    monkeypatch.setattr(registry, "delete_node_records", real)
    await asyncio.sleep(0.05)
    info = keys.decode(registry.data[keys.node_link_key("n1", "cp-1")].value, mesh_pb2.NodeInfo())
    assert info.copies[0].state == mesh_pb2.READY  # the new stream's record stands
    await writer.close()
