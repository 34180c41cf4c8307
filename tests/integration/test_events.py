"""meshserve.controlplane.observe.events.EventLog on the etcd registry against a real etcd (one
fresh server per test)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshserve.controlplane import keys
from meshserve.controlplane.etcd import connect
from meshserve.controlplane.observe.events import EventLog
from meshserve.controlplane.registry import EtcdRegistry
from tests.support.etcd import EtcdServer
from tests.support.fake_registry import FakeRegistry
from tests.support.inproc import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]


async def ring_keys(client: Any) -> list[str]:
    """Event keys in etcd, ascending (the counter lives outside the prefix)."""
    result = await client.get_prefix(keys.EVENTS.encode(), sort_order="ascend")
    return [kv.key.decode() for kv in result]


async def test_two_replicas_get_unique_increasing_seqs(etcd: EtcdServer, client: Any) -> None:
    other = await connect(etcd.url)
    logs = [EventLog(EtcdRegistry(client), "r1"), EventLog(EtcdRegistry(other), "r2")]
    try:
        for log in logs:
            log.start()

        async def burst(log: EventLog, name: str) -> None:
            for i in range(15):
                log.record("placement", model=f"m{i % 3}", message=f"{name}-{i}")
                if i % 4 == 3:  # let the writers race on the counter several times
                    await asyncio.sleep(0.005)

        await asyncio.gather(burst(logs[0], "a"), burst(logs[1], "b"))
        await asyncio.gather(*(log.close() for log in logs))
        assert [log.stats for log in logs] == [{"pending": 0, "written": 15, "dropped": 0}] * 2

        events = await logs[0].list(limit=100)
        seqs = [e.seq for e in events]
        assert seqs == list(range(1, 31))  # unique, strictly increasing, no gaps
        assert {e.replica_id for e in events} == {"r1", "r2"}
        assert sorted(e.message for e in events) == sorted(
            [f"a-{i}" for i in range(15)] + [f"b-{i}" for i in range(15)]
        )
        # each replica's own events stay in the order it recorded them
        for prefix in ("a", "b"):
            mine = [int(e.message[2:]) for e in events if e.message.startswith(prefix)]
            assert mine == list(range(15))
        assert all(e.unix_ms > 0 and e.kind == "placement" for e in events)
        assert (await client.get(keys.EVENTS_SEQ.encode())).value == b"30"
        assert len(await ring_keys(client)) == 30
    finally:
        await other.close()


async def test_ring_keeps_newest_capacity_events(client: Any) -> None:
    log = EventLog(EtcdRegistry(client), "r1", capacity=10)
    log.start()
    for i in range(25):
        log.record("scale", model="m", message=str(i))
        if i % 7 == 0:
            await asyncio.sleep(0.01)  # several batches, some below capacity
    await log.close()
    assert log.stats == {"pending": 0, "written": 25, "dropped": 0}

    assert await ring_keys(client) == [f"{keys.EVENTS}{s:020d}" for s in range(16, 26)]
    events = await log.list(limit=0)  # 0 -> 50 -> clamped to capacity
    assert [e.seq for e in events] == list(range(16, 26))
    assert [e.message for e in events] == [str(i) for i in range(15, 25)]
    assert [e.seq for e in await log.list(limit=3)] == [23, 24, 25]
    assert [e.seq for e in await log.list(limit=-5)] == [25]


async def test_filters_by_kind_and_model(client: Any) -> None:
    log = EventLog(EtcdRegistry(client), "r1")
    log.start()
    for i in range(12):
        kind = ["placement", "evict", "drain"][i % 3]
        log.record(kind, model=f"m{i % 2}", variant="v", node_id=f"n{i}", message=str(i))
    await log.close()

    evicts = await log.list(kind="evict")
    assert [e.message for e in evicts] == ["1", "4", "7", "10"]
    assert [e.message for e in await log.list(model="m0")] == ["0", "2", "4", "6", "8", "10"]
    assert [e.message for e in await log.list(kind="evict", model="m0")] == ["4", "10"]
    assert [e.message for e in await log.list(limit=2, kind="drain")] == ["8", "11"]
    assert await log.list(kind="policy") == []
    assert await log.list(model="nope") == []
    newest = (await log.list(limit=1))[0]
    assert (newest.kind, newest.model, newest.variant, newest.node_id) == (
        "drain",
        "m1",
        "v",
        "n11",
    )


async def test_close_flushes_pending(client: Any) -> None:
    log = EventLog(EtcdRegistry(client), "r1")
    log.start()
    for i in range(40):  # no await in between: everything is still pending at close()
        log.record("reroute", message=str(i))
    assert log.stats["pending"] == 40
    await log.close()
    assert log.stats == {"pending": 0, "written": 40, "dropped": 0}
    reader = EventLog(EtcdRegistry(client), "reader")
    assert [e.message for e in await reader.list(limit=100)] == [str(i) for i in range(40)]
    await log.close()  # idempotent


async def test_bounded_queue_drops_oldest(client: Any) -> None:
    log = EventLog(EtcdRegistry(client), "r1", max_pending=5)
    for i in range(8):  # writer not started yet: all queued
        log.record("policy", message=str(i))
    assert log.stats == {"pending": 5, "written": 0, "dropped": 3}
    log.start()
    await log.close()
    assert [e.message for e in await log.list()] == ["3", "4", "5", "6", "7"]


def test_empty_kind_is_rejected() -> None:
    log = EventLog(FakeRegistry(), "r1")
    with pytest.raises(ValueError, match="kind"):
        log.record("")
    log.record("evict", model="m")  # no writer, no loop: queued, no error
    assert log.stats["pending"] == 1


def test_event_is_added_to_the_current_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    log = EventLog(FakeRegistry(), "r1")
    with provider.get_tracer("test").start_as_current_span("decide"):
        log.record("evict", model="m", node_id="n1", message="idle")
    (span,) = exporter.get_finished_spans()
    (event,) = span.events
    assert event.name == "evict"
    assert dict(event.attributes or {}) == {
        "meshserve.model": "m",
        "meshserve.node": "n1",
        "message": "idle",
    }


async def test_record_survives_etcd_outage(etcd: EtcdServer, client: Any) -> None:
    log = EventLog(EtcdRegistry(client), "r1", max_pending=15)
    log.start()
    log.record("drain", message="before")
    await eventually(lambda: log.stats["written"] == 1, 5.0)

    await asyncio.to_thread(etcd.stop)
    started = time.monotonic()
    for i in range(20):
        log.record("drain", node_id="n1", message=str(i))
    assert time.monotonic() - started < 0.5  # record() never waits for etcd
    await asyncio.sleep(0.5)  # the writer fails and backs off
    assert log.stats == {"pending": 15, "written": 1, "dropped": 5}

    await asyncio.to_thread(etcd.restart)
    await eventually(lambda: log.stats["pending"] == 0, 8.0)
    await log.close()
    assert log.stats == {"pending": 0, "written": 16, "dropped": 5}
    events = await log.list()
    assert [e.message for e in events] == ["before"] + [str(i) for i in range(5, 20)]
    assert [e.seq for e in events] == list(range(1, 17))


class _LosesFirstReply:
    """Forwards to a real client, but the first transaction's reply is "lost" after it
    committed (as with a deadline that expires while etcd applies the request)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.transactions = client.transactions
        self.txns = 0
        self.conflicts = 0

    async def transaction(self, **kwargs: Any) -> Any:
        self.txns += 1
        ok, responses = await self._client.transaction(**kwargs)
        if not ok:
            self.conflicts += 1
        if self.txns == 1:
            raise TimeoutError("reply lost")
        return ok, responses

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def test_committed_batch_with_lost_reply_is_not_rewritten(client: Any) -> None:
    wrapped = _LosesFirstReply(client)
    log = EventLog(EtcdRegistry(wrapped), "r1")
    log.start()
    for i in range(3):
        log.record("placement", message=str(i))
    await eventually(lambda: log.stats["pending"] == 0, 5.0)
    log.record("placement", message="3")
    await log.close()
    assert log.stats == {"pending": 0, "written": 4, "dropped": 0}
    events = await log.list()
    assert [(e.seq, e.message) for e in events] == [(1, "0"), (2, "1"), (3, "2"), (4, "3")]
    # the last write found the counter moved by the "lost" commit and retried once
    assert wrapped.conflicts == 1
