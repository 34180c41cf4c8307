"""Tunneled queries (answers) that waited together go in one message (common/tunneling.py),
and the replica's outbox writes what its merge step takes (controlplane/link/outbox.py)."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from meshserve.common.tunneling import take_frames
from meshserve.controlplane.link.outbox import Outbox
from meshserve.protos import inference_pb2, mesh_pb2


def _query(n: int, size: int = 8) -> mesh_pb2.ControlMessage:
    request = inference_pb2.ModelInferRequest(model_name="m", raw_input_contents=[b"x" * size])
    return mesh_pb2.ControlMessage(
        infer_request=mesh_pb2.TunnelRequest(correlation_id=n, request=request)
    )


def _load() -> mesh_pb2.ControlMessage:
    return mesh_pb2.ControlMessage(load=mesh_pb2.LoadModel(model="m", variant="v"))


def _take(items: deque[mesh_pb2.ControlMessage], **kw: int) -> mesh_pb2.ControlMessage:
    return take_frames(items, "infer_request", "infer_batch", kw.pop("max_bytes", 1 << 20), **kw)


def test_queries_that_waited_together_go_in_one_message_in_order() -> None:
    items = deque([_query(1), _query(2), _query(3), _load(), _query(4)])
    batch = _take(items)
    assert batch.WhichOneof("body") == "infer_batch"
    assert [f.correlation_id for f in batch.infer_batch.frames] == [1, 2, 3]
    assert batch.infer_batch.frames[2].request.raw_input_contents == [b"x" * 8]
    assert _take(items).WhichOneof("body") == "load"  # another kind breaks the run
    lone = _take(items)
    assert lone.WhichOneof("body") == "infer_request"  # a lone frame goes as it is
    assert lone.infer_request.correlation_id == 4 and not items


def test_a_batch_is_bounded_in_frames_and_bytes_and_always_takes_the_first() -> None:
    items = deque(_query(n) for n in range(10))
    assert len(_take(items, max_frames=4).infer_batch.frames) == 4
    assert len(items) == 6
    big = deque(_query(n, size=1000) for n in range(5))
    first = _take(big, max_bytes=2500)  # two frames of ~1 KB fit, the third does not
    assert [f.correlation_id for f in first.infer_batch.frames] == [0, 1]
    tiny = deque(_query(n, size=1000) for n in range(3))
    alone = _take(tiny, max_bytes=10)  # over the bound on its own: still sent (checked earlier)
    assert alone.WhichOneof("body") == "infer_request" and len(tiny) == 2


def test_answers_merge_the_same_way() -> None:
    def answer(n: int) -> mesh_pb2.NodeMessage:
        return mesh_pb2.NodeMessage(infer_response=mesh_pb2.TunnelResponse(correlation_id=n))

    items = deque([answer(1), answer(2)])
    out = take_frames(items, "infer_response", "infer_answers", 1 << 20)
    assert [f.correlation_id for f in out.infer_answers.frames] == [1, 2] and not items


@pytest.mark.asyncio
async def test_the_outbox_writes_what_its_merge_step_takes() -> None:
    written: list[mesh_pb2.ControlMessage] = []
    gate = asyncio.Event()

    async def write(message: mesh_pb2.ControlMessage) -> None:
        await gate.wait()
        written.append(message)

    box: Outbox[mesh_pb2.ControlMessage] = Outbox(100)
    box.attach(write, lambda items: _take(items))
    box.put_nowait(_query(1))
    await asyncio.sleep(0)  # the writer took 1 and waits on its write
    for n in (2, 3, 4):
        box.put_nowait(_query(n))
    gate.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert [m.WhichOneof("body") for m in written] == ["infer_request", "infer_batch"]
    assert [f.correlation_id for f in written[1].infer_batch.frames] == [2, 3, 4]
    assert box.empty() and box._task is None
    await box.close()
