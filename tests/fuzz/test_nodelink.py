"""Hostile NodeLink streams: random sequences of NodeMessage (no Hello first, odd node ids, a
second Hello, CopyStatus for unknown models, absurd or NaN telemetry, tunnel answers nobody
waits for, bytes that do not decode). The hub answers with a precise status or ignores the
message; it never crashes, and the well-behaved nodes keep serving."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.protos import mesh_pb2
from tests.fuzz._support import FUZZ, PRECISE, LiveMesh, answer
from tests.fuzz.test_infer import _still_serves

CONNECT = "/meshserve.v1.NodeLink/Connect"
LINK_STATUSES = PRECISE | {grpc.StatusCode.ALREADY_EXISTS}  # a second stream for a node id

numbers = st.floats()
node_ids = st.one_of(
    st.integers(0, 10**6).map("fuzz-{}".format),
    st.sampled_from(["", "edge", "-x", "a/b", "x" * 129, "é", "a b"]),
    st.text(max_size=40),
)
copy_statuses = st.builds(
    mesh_pb2.CopyStatus,
    model=st.sampled_from(["mlp", "ghost"]) | st.text(max_size=10),
    variant=st.sampled_from(["default", ""]) | st.text(max_size=10),
    state=st.integers(0, 6),
    reason=st.text(max_size=40),
    memory_bytes=st.integers(0, 2**64 - 1),
    load_seconds=numbers,
    sha256=st.text(max_size=64),
    latency_profile=st.lists(
        st.builds(mesh_pb2.LatencyPoint, batch_size=st.integers(0, 2**32 - 1), seconds=numbers),
        max_size=3,
    ),
)
windows = st.builds(
    mesh_pb2.DriftWindow,
    seq=st.integers(0, 2**64 - 1),
    rows=st.integers(0, 2**64 - 1),
    features=st.lists(
        st.builds(mesh_pb2.SketchCounts, counts=st.lists(st.integers(0, 2**64 - 1), max_size=70)),
        max_size=4,
    ),
    output=st.builds(
        mesh_pb2.SketchCounts, counts=st.lists(st.integers(0, 2**64 - 1), max_size=70)
    ),
)
model_telemetry = st.builds(
    mesh_pb2.ModelTelemetry,
    model=st.sampled_from(["mlp", "ghost"]) | st.text(max_size=10),
    variant=st.sampled_from(["default"]) | st.text(max_size=10),
    in_flight=st.integers(0, 2**32 - 1),
    requests=st.integers(0, 2**64 - 1),
    errors=st.integers(0, 2**64 - 1),
    latency_p50_ms=numbers,
    latency_p99_ms=numbers,
    queue_depth=st.integers(0, 2**32 - 1),
    max_batch_size=st.integers(0, 2**32 - 1),
    drift=windows | st.none(),
    feedback_joined=st.integers(0, 2**64 - 1),
    feedback_correct=st.integers(0, 2**64 - 1),
    feedback_abs_error=numbers,
)
telemetry = st.builds(
    mesh_pb2.Telemetry,
    unix_ms=st.integers(0, 2**64 - 1),
    cpu_percent=numbers,
    rss_bytes=st.integers(0, 2**64 - 1),
    models=st.lists(model_telemetry, max_size=4),
)


@st.composite
def hellos(draw: st.DrawFn) -> mesh_pb2.Hello:
    hello = mesh_pb2.Hello(
        node_id=draw(node_ids),
        labels=draw(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5)),
        direct_address=draw(st.sampled_from(["", "127.0.0.1:1", "::::", "nowhere"])),
        version=draw(st.text(max_size=10)),
    )
    hello.copies.extend(draw(st.lists(copy_statuses, max_size=3)))
    hello.hardware.cpu_cores = draw(st.integers(0, 2**32 - 1))
    return hello


messages = st.one_of(
    hellos().map(lambda h: mesh_pb2.NodeMessage(hello=h).SerializeToString()),
    copy_statuses.map(lambda c: mesh_pb2.NodeMessage(copy_status=c).SerializeToString()),
    telemetry.map(lambda t: mesh_pb2.NodeMessage(telemetry=t).SerializeToString()),
    st.builds(
        mesh_pb2.TunnelResponse,
        correlation_id=st.integers(0, 2**64 - 1),
        status_code=st.integers(-(2**31), 2**31 - 1),
        status_message=st.text(max_size=20),
    ).map(lambda r: mesh_pb2.NodeMessage(infer_response=r).SerializeToString()),
    st.binary(max_size=64),
    st.just(b""),
)


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """Mostly a valid Hello first (so the later messages reach the hub's loop), else anything."""
    rest = draw(st.lists(messages, max_size=8))
    if draw(st.integers(0, 3)):
        hello = draw(hellos())
        hello.node_id = f"fuzz-{draw(st.integers(0, 10**6))}"
        return [mesh_pb2.NodeMessage(hello=hello).SerializeToString(), *rest]
    return rest


def test_random_node_streams_are_refused_or_ignored(mesh: LiveMesh) -> None:
    with grpc.insecure_channel(mesh.address) as channel:
        connect = channel.stream_stream(
            CONNECT, request_serializer=None, response_deserializer=None
        )

        def link(frames: Iterable[bytes], timeout: float) -> list[Any]:
            return list(connect(iter(frames), timeout=timeout))

        @settings(FUZZ, max_examples=120)
        @given(frames=streams())
        def check(frames: list[bytes]) -> None:
            code, replies = answer(link, frames, allowed=LINK_STATUSES)
            if code == grpc.StatusCode.OK and replies:
                first = mesh_pb2.ControlMessage.FromString(replies[0])
                assert first.HasField("welcome")
            hub = mesh.mesh.cp.hub
            assert hub is not None
            assert mesh.on_loop(lambda: {"edge", "core"} <= set(hub.sessions))

        check()

    # Every fuzz node's record goes with its stream; the real nodes are still linked and serve.
    mesh.wait_for(
        lambda: set(mesh.mesh.cp.snapshot().nodes) == {"edge", "core"}, what="fuzz records gone"
    )
    _still_serves(mesh, mesh.address)


def test_a_copy_status_in_a_state_the_enum_does_not_name_is_no_internal_error(
    mesh: LiveMesh,
) -> None:
    """Found by fuzzing: a READY-looking report with state 5 (no CopyState has it) made the
    refusal's log line raise, and the stream ended INTERNAL."""
    hello = mesh_pb2.NodeMessage(hello=mesh_pb2.Hello(node_id="fuzz-state-5"))
    status = mesh_pb2.CopyStatus(model="ghost", variant="default", state=5)  # type: ignore[arg-type]
    frames = [
        hello.SerializeToString(),
        mesh_pb2.NodeMessage(copy_status=status).SerializeToString(),
    ]
    with grpc.insecure_channel(mesh.address) as channel:
        connect = channel.stream_stream(
            CONNECT, request_serializer=None, response_deserializer=None
        )

        def link(frames: Iterable[bytes], timeout: float) -> list[Any]:
            return list(connect(iter(frames), timeout=timeout))

        answer(link, frames, allowed=LINK_STATUSES)  # asserts OK or a precise status
