"""The node's multiplexed stream (NodeInference.Infer) and its client (MuxChannel), for real.

Real etcd, a control-plane process and two node processes with direct ports: ``n1`` serves
``mlp``; ``n2`` serves ``mlp-slow`` with 300 ms of injected delay per query (deadlines, and a
kill with queries in flight). The tests share the mesh (module scope) and run in file order: the
last one kills and restarts ``n2``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio

from meshserve.client._admin import AdminClient
from meshserve.common.codec import build_request, decode_response_outputs
from meshserve.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    StatusError,
    Unavailable,
)
from meshserve.common.mux import INFER_METHOD, MuxChannel
from meshserve.devtools.demo_models import make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, ManagedProcess, free_port, wait_until
from meshserve.node.link import channel_options
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2
from tests.support.mesh import register_file, wait_copies
from tests.support.spans import logged_span

pytestmark = pytest.mark.integration

SLOW_MS = 300


@dataclass
class Mesh:
    mesh: LocalMesh
    cp: ManagedProcess
    model: Path
    fast: str  # n1's direct address
    slow: str  # n2's direct address
    slow_argv: list[str]


def _start_slow(mesh: LocalMesh, cp: ManagedProcess, address: str) -> ManagedProcess:
    return mesh.start_node(
        "n2",
        [cp.address],
        labels={"role": "slow"},
        extra=["--listen", address, "--fault-delay-ms", str(SLOW_MS)],
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("mux")
    model = make_mlp(work / "mlp.onnx")
    env = {**os.environ, "MESHSERVE_TRACE_CONSOLE": "1", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with LocalMesh(work, env=env) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        fast, slow = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        mesh.start_node("n1", [cp.address], labels={"role": "fast"}, extra=["--listen", fast])
        n2 = _start_slow(mesh, cp, slow)
        with AdminClient(cp.address) as admin:
            wait_until(lambda: len(admin.list_nodes()) == 2, 30, what="two nodes")
            register_file(admin, "mlp", model, selector={"role": "fast"})
            register_file(admin, "mlp-slow", model, selector={"role": "slow"})
            wait_copies(admin, "mlp", 1)
            wait_copies(admin, "mlp-slow", 1)
        yield Mesh(mesh, cp, model, fast, slow, n2.argv)


def _channel(address: str) -> aio.Channel:
    return aio.insecure_channel(address, options=channel_options(64 << 20, 1000))


def _x(seed: int, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


async def test_mux_answers_equal_the_unary_answers_of_the_same_node(live: Mesh) -> None:
    request = build_request("mlp", {"x": _x(1, rows=3)})
    async with _channel(live.fast) as channel:
        unary = await inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=10
        )
        mux = MuxChannel(channel)
        try:
            answer = await mux.call_message(request, timeout=10)
            raw = inference_pb2.ModelInferResponse.FromString(
                await mux.call(request.SerializeToString(), timeout=10)
            )
            # the router's variant choice overrides the request's version
            chosen = await mux.call_message(request, variant=unary.model_version, timeout=10)
            with pytest.raises(NotFound):
                await mux.call_message(request, variant="no-such-variant", timeout=10)
        finally:
            await mux.close()
    for response in (answer, raw, chosen):
        assert response.raw_output_contents == unary.raw_output_contents
        assert response.model_name == "mlp" and response.model_version == unary.model_version
        assert response.parameters["meshserve_node"].string_param == "n1"
    np.testing.assert_allclose(
        decode_response_outputs(answer)["y"],
        reference_outputs(live.model, {"x": _x(1, rows=3)})["y"],
        rtol=1e-5,
        atol=1e-5,
    )


async def test_the_frame_trace_context_parents_the_node_span(live: Mesh) -> None:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{span_id}-01"
    async with _channel(live.fast) as channel:
        mux = MuxChannel(channel)
        try:
            await mux.call_message(
                build_request("mlp", {"x": _x(5)}),
                trace_context={"traceparent": traceparent},
                timeout=10,
            )
        finally:
            await mux.close()
    n1 = next(p for p in live.mesh.processes if p.name == "n1")

    def node_span() -> dict[str, Any] | None:
        return logged_span(n1.log_path, trace_id)

    span = await asyncio.to_thread(wait_until, node_span, 15, what="the node's span in its log")
    assert span["name"] == "node ModelInfer"
    assert span["parent_id"] == f"0x{span_id}"
    assert span["attributes"]["meshserve.hop"] == "mux"


async def test_200_concurrent_calls_on_one_stream_are_all_correct(live: Mesh) -> None:
    xs = [_x(100 + i, rows=1 + i % 3) for i in range(200)]
    expected = [reference_outputs(live.model, {"x": x})["y"] for x in xs]
    async with _channel(live.fast) as channel:
        mux = MuxChannel(channel, max_in_flight=64)  # more calls than slots: they queue
        try:
            answers = await asyncio.gather(
                *(mux.call_message(build_request("mlp", {"x": x}), timeout=30) for x in xs)
            )
            assert mux.reopened == 0
        finally:
            await mux.close()
    for answer, want in zip(answers, expected, strict=True):
        np.testing.assert_allclose(decode_response_outputs(answer)["y"], want, 1e-5, 1e-5)


async def test_a_bad_frame_fails_alone_and_the_stream_goes_on(live: Mesh) -> None:
    good = build_request("mlp", {"x": _x(2)}).SerializeToString()
    async with _channel(live.fast) as channel:
        mux = MuxChannel(channel)
        try:
            first = mux.call(good, timeout=10)
            with pytest.raises(InvalidArgument, match="does not decode"):
                await mux.call(b"\xff\xff\xff\xff", timeout=10)
            with pytest.raises(InvalidArgument, match="model_name is empty"):
                await mux.call(b"", timeout=10)
            bad_input = build_request("mlp", {"x": np.zeros((1, 3), np.float32)})
            with pytest.raises(InvalidArgument):
                await mux.call_message(bad_input, timeout=10)
            answers = await asyncio.gather(first, *(mux.call(good, timeout=10) for _ in range(5)))
            assert len(set(answers)) == 1
            assert mux.reopened == 0  # the same stream throughout
        finally:
            await mux.close()


async def test_a_call_past_its_timeout_is_deadline_exceeded(live: Mesh) -> None:
    request = build_request("mlp-slow", {"x": _x(3)}).SerializeToString()
    async with _channel(live.slow) as channel:
        mux = MuxChannel(channel)
        try:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await mux.call(request, timeout=0.05)
            assert time.monotonic() - started < 0.3  # not held until the node answers
            assert mux.in_flight == 0  # forgotten
            assert await mux.call(request, timeout=10)  # the stream still answers
        finally:
            await mux.close()
        # The node enforces the frame's budget itself (no client-side timer here).
        call = channel.stream_stream(
            INFER_METHOD,
            request_serializer=mesh_pb2.MuxRequests.SerializeToString,
            response_deserializer=mesh_pb2.MuxResponses.FromString,
        )()
        frame = mesh_pb2.MuxRequest(id=7, request=request, timeout_ms=50)
        await call.write(mesh_pb2.MuxRequests(frames=[frame]))
        (answer,) = (await asyncio.wait_for(call.read(), 10)).frames
        await call.done_writing()
        assert answer.id == 7
        assert answer.status_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert "n2" in answer.status_message


async def test_cancelled_callers_and_oversized_requests_leave_the_stream_alone(
    live: Mesh,
) -> None:
    slow = build_request("mlp-slow", {"x": _x(6)}).SerializeToString()
    async with _channel(live.slow) as channel:
        mux = MuxChannel(channel, max_message_bytes=16 << 10)
        try:
            assert await mux.call(slow, timeout=10)
            waiting = [asyncio.ensure_future(mux.call(slow)) for _ in range(10)]
            await asyncio.sleep(0.05)
            for task in waiting:  # a caller going away (a gateway's client hung up)
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            assert mux.in_flight == 0
            big = build_request("mlp-slow", {"x": _x(7, rows=100)}).SerializeToString()
            with pytest.raises(InvalidArgument, match="over the"):
                await mux.call(big, timeout=10)
            assert await mux.call(slow, timeout=10)
            assert mux.reopened == 0  # the same stream throughout
            pending = asyncio.ensure_future(mux.call(slow))
            await asyncio.sleep(0.05)
        finally:
            await mux.close()
        with pytest.raises(Unavailable, match="closed"):
            await pending
        with pytest.raises(Unavailable, match="closed"):
            await mux.call(slow)


async def test_killing_the_node_fails_pending_calls_and_the_channel_reconnects(
    live: Mesh,
) -> None:
    request = build_request("mlp-slow", {"x": _x(4)}).SerializeToString()
    n2 = next(p for p in live.mesh.processes if p.name == "n2" and p.alive())
    async with _channel(live.slow) as channel:
        mux = MuxChannel(channel)
        try:
            assert await mux.call(request, timeout=10)
            pending = [asyncio.ensure_future(mux.call(request)) for _ in range(20)]  # no timeout
            await asyncio.sleep(0.1)
            n2.kill()
            started = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
            assert time.monotonic() - started < 5
            errors = [r for r in results if isinstance(r, BaseException)]
            assert len(errors) == 20, results
            for error in errors:
                assert isinstance(error, Unavailable), repr(error)
                assert live.slow in error.message
            with pytest.raises(Unavailable):  # nothing listens: the next call fails fast
                await mux.call(request, timeout=10)

            _start_slow(live.mesh, live.cp, live.slow)
            deadline = time.monotonic() + 60
            answer = b""
            while not answer:
                try:
                    answer = await mux.call(request, timeout=10)
                except (Unavailable, NotFound, StatusError):
                    assert time.monotonic() < deadline, "no answer from the restarted node"
                    await asyncio.sleep(0.2)
            response = inference_pb2.ModelInferResponse.FromString(answer)
            assert response.parameters["meshserve_node"].string_param == "n2"
            assert mux.reopened >= 1
        finally:
            await mux.close()
