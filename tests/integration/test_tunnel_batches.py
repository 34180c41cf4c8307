"""Tunneled queries that wait together go down a node's stream in one message, only to a node
that said it reads them (Hello.tunnel_batches); the replica reads answers sent either way.

A real control plane on a real etcd, and a tunnel-only *fake node* (a raw NodeLink client,
tests/support/fake_node.py) that holds an ordered copy: it records how queries
arrive and answers them as told. Queries wait for the stream when the node reads slower than
they come: the fake node stops reading while they are sent (quarter-megabyte queries fill the
stream's flow-control window), then reads on. Every wait is bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from meshserve.client._admin import AdminClient
from meshserve.common.codec import build_request
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.devtools.local import LocalMesh, wait_until
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2
from tests.support.fake_node import FakeNode, load_of

QUERIES = 48
ROWS = 1024  # 1024 x 64 float32: 256 KiB a query (a batch carries about 1 MiB)


class SlowFake(FakeNode):
    """A fake node whose reading stops while ``reading`` is clear (a node busy elsewhere)."""

    def __init__(self, address: str, hello: mesh_pb2.Hello) -> None:
        self.reading = threading.Event()
        self.reading.set()
        super().__init__(address, hello)

    def _read(self) -> None:
        try:
            for message in self._call:
                self.inbox.put(message)
                self.reading.wait(30)
        except grpc.RpcError:
            pass


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[LocalMesh, str]]:
    with LocalMesh(tmp_path, lease_ttl_s=3) as local:
        local.start_etcd()
        cp = local.start_controlplane("cp-1")
        yield local, cp.address


def _serving_fake(address: str, tmp_path: Path, batches: bool) -> SlowFake:
    """A tunnel-only fake node holding a READY copy of ``mlp`` the control plane ordered."""
    model = make_mlp(tmp_path / "mlp.onnx")
    sha = sha256_file(model)
    fake = SlowFake(address, mesh_pb2.Hello(node_id="fake-1", tunnel_batches=batches))
    welcome = fake.wait_for(lambda m: m.HasField("welcome")).welcome
    assert welcome.tunnel_batches, "a replica says it reads batched answers"
    with AdminClient(address) as admin:
        admin.register_model("mlp", model.as_uri(), sha)
        fake.report_ready(admin, "mlp", fake.wait_for(load_of("mlp")).load.sha256)
    return fake


def _queries(address: str) -> list[object]:
    """QUERIES concurrent ModelInfer calls through the replica's gateway (started now; the
    results are futures)."""
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)])
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    x = np.zeros((ROWS, 64), dtype=np.float32)
    pool = ThreadPoolExecutor(QUERIES)
    futures = [
        pool.submit(stub.ModelInfer, build_request("mlp", {"x": x}, request_id=f"q{i}"), timeout=20)
        for i in range(QUERIES)
    ]
    pool.shutdown(wait=False)
    return futures


def _frames(fake: SlowFake) -> tuple[list[mesh_pb2.TunnelRequest], int]:
    """The tunneled queries received so far, and how many messages carried more than one."""
    frames: list[mesh_pb2.TunnelRequest] = []
    batches = 0
    for message in fake.drain():
        if message.HasField("infer_request"):
            frames.append(message.infer_request)
        elif message.HasField("infer_batch"):
            frames.extend(message.infer_batch.frames)
            batches += 1
    return frames, batches


def _arrived(futures: list[object]) -> None:
    """Wait a moment for the queries to reach the gateway (none is answered yet)."""
    time.sleep(1.5)
    assert not any(f.done() for f in futures)  # type: ignore[attr-defined]


def _answer(frame: mesh_pb2.TunnelRequest) -> mesh_pb2.TunnelResponse:
    return mesh_pb2.TunnelResponse(
        correlation_id=frame.correlation_id,
        response=inference_pb2.ModelInferResponse(
            model_name="mlp", id=frame.request.id, model_version="default"
        ),
    )


def _ready(address: str) -> None:
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    wait_until(
        lambda: stub.ModelReady(inference_pb2.ModelReadyRequest(name="mlp"), timeout=5).ready,
        20,
        what="mlp ready at the gateway",
    )


def _sent_while_busy(
    address: str, tmp_path: Path, batches: bool
) -> tuple[SlowFake, list[object], list[mesh_pb2.TunnelRequest], int]:
    """A serving fake node that stops reading while QUERIES queries come, then reads them all:
    the fake, the queries' futures, the frames it got and how many messages carried several."""
    fake = _serving_fake(address, tmp_path, batches)
    _ready(address)
    fake.reading.clear()  # busy: the stream backs up while the queries come
    futures = _queries(address)
    _arrived(futures)
    fake.reading.set()
    wait_until(lambda: len(_frames(fake)[0]) == QUERIES, 20, what="every query tunneled")
    frames, batched = _frames(fake)
    assert sorted(f.request.id for f in frames) == sorted(f"q{i}" for i in range(QUERIES))
    assert len({f.correlation_id for f in frames}) == QUERIES
    return fake, futures, frames, batched


def _answered(futures: list[object]) -> None:
    ids = sorted(f.result(timeout=20).id for f in futures)  # type: ignore[attr-defined]
    assert ids == sorted(f"q{i}" for i in range(QUERIES))


def test_a_node_that_reads_batches_gets_queries_together_and_may_answer_them_together(
    mesh: tuple[LocalMesh, str], tmp_path: Path
) -> None:
    fake, futures, frames, batched = _sent_while_busy(mesh[1], tmp_path, batches=True)
    try:
        assert batched >= 1, "queries that waited for the stream went in one message"
        # every answer in one message: the replica resolves each query
        fake.send(infer_answers=mesh_pb2.TunnelResponses(frames=[_answer(f) for f in frames]))
        _answered(futures)
    finally:
        fake.close()


def test_a_node_that_did_not_say_so_gets_one_query_per_message(
    mesh: tuple[LocalMesh, str], tmp_path: Path
) -> None:
    fake, futures, frames, batched = _sent_while_busy(mesh[1], tmp_path, batches=False)
    try:
        assert batched == 0, "an older node is never sent a message it cannot read"
        for frame in frames:
            fake.send(infer_response=_answer(frame))
        _answered(futures)
    finally:
        fake.close()
