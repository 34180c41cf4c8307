"""A stream's send queue (controlplane/link/outbox.py): bounded, in order, a writer task only
while messages wait."""

from __future__ import annotations

import asyncio

import pytest

from meshserve.controlplane.link.outbox import Outbox


@pytest.mark.asyncio
async def test_messages_go_out_in_order_and_an_idle_outbox_holds_no_task() -> None:
    sent: list[int] = []
    gate = asyncio.Event()

    async def write(item: int) -> None:
        await gate.wait()
        sent.append(item)

    box: Outbox[int] = Outbox(3)
    box.put_nowait(1)  # before attach: waits for it
    await asyncio.sleep(0)
    assert box._task is None and box.qsize() == 1
    box.attach(write)
    await asyncio.sleep(0)  # the writer took 1 and waits on its write
    box.put_nowait(2)
    assert box._task is not None
    box.put_nowait(3)
    box.put_nowait(4)  # 1 is being written: 2, 3, 4 wait
    with pytest.raises(asyncio.QueueFull):
        box.put_nowait(5)  # bounded: refused, never waits
    gate.set()
    for _ in range(50):
        await asyncio.sleep(0)
    assert sent == [1, 2, 3, 4]
    assert box._task is None and box.empty()  # idle again: no task
    box.put_nowait(6)
    for _ in range(10):
        await asyncio.sleep(0)
    assert sent[-1] == 6 and box._task is None
    await box.close()


@pytest.mark.asyncio
async def test_a_failed_write_stops_sending_and_close_cancels_a_write_in_flight() -> None:
    async def broken(item: int) -> None:
        raise ConnectionError("stream gone")

    box: Outbox[int] = Outbox(10)
    box.attach(broken)
    box.put_nowait(1)
    box.put_nowait(2)
    for _ in range(10):
        await asyncio.sleep(0)
    assert box.qsize() == 1 and box._task is None  # 2 stays queued, no new task
    box.put_nowait(3)
    await asyncio.sleep(0)
    assert box._task is None

    stuck = asyncio.Event()

    async def hangs(item: int) -> None:
        await stuck.wait()

    slow: Outbox[int] = Outbox(10)
    slow.attach(hangs)
    slow.put_nowait(1)
    await asyncio.sleep(0)
    assert slow._task is not None
    await asyncio.wait_for(slow.close(), 1)
    assert slow._task is None
