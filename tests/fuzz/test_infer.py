"""Hostile ModelInfer requests, via the gateway and the node's direct OIP port.

Property: every call answers OK or a precise status (``PRECISE``) with a message, quickly;
the servers stay up, a valid query still gets the right answer, and memory stays bounded.
"""

from __future__ import annotations

import struct
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.common.codec import DATATYPES, build_request, decode_response_outputs
from meshserve.protos import inference_pb2, inference_pb2_grpc
from tests.fuzz._support import FUZZ, MAX_MESSAGE, LiveMesh, answer, mlp_expected

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
TARGETS = ["gateway", "direct"]

# ---------------------------------------------------------------------------- strategies

datatypes = st.one_of(st.sampled_from(sorted(DATATYPES)), st.text(max_size=8))
dims = st.one_of(
    st.sampled_from([0, 1, 2, 64, -1, 2**31, 2**40, 2**63 - 1, -(2**63)]),
    st.integers(-3, 70),
)
shapes = st.one_of(st.just([1, 64]), st.lists(dims, max_size=40))
f32 = st.floats(width=32)  # NaN and infinities included
raw_floats = st.lists(f32, min_size=60, max_size=70).map(
    lambda v: np.array(v, np.float32).tobytes()
)
length_prefixed = st.lists(
    st.tuples(st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)), st.binary(max_size=40)),
    max_size=8,
).map(lambda items: b"".join(struct.pack("<I", n) + data for n, data in items))
raw_contents = st.one_of(
    st.integers(0, 600).map(bytes), raw_floats, length_prefixed, st.binary(max_size=300)
)
typed_values: dict[str, st.SearchStrategy[list[Any]]] = {
    "bool_contents": st.lists(st.booleans(), max_size=80),
    "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=80),
    "int64_contents": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=80),
    "uint_contents": st.lists(st.integers(0, 2**32 - 1), max_size=80),
    "uint64_contents": st.lists(st.integers(0, 2**64 - 1), max_size=80),
    "fp32_contents": st.lists(f32, max_size=80),
    "fp64_contents": st.lists(st.floats(), max_size=80),
    "bytes_contents": st.lists(st.binary(max_size=20), max_size=80),
}
param_keys = st.one_of(
    st.sampled_from(["slo_ms", "min_accuracy", "client_zone", "meshserve_prefer", "priority"]),
    st.text(max_size=300),
)


@st.composite
def parameters(draw: st.DrawFn) -> inference_pb2.InferParameter:
    kind = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64", "none"]))
    p = inference_pb2.InferParameter()
    if kind == "bool":
        p.bool_param = draw(st.booleans())
    elif kind == "int64":
        p.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    elif kind == "string":
        p.string_param = draw(
            st.one_of(st.text(max_size=50), st.integers(0, 5000).map("a".__mul__))
        )
    elif kind == "double":
        p.double_param = draw(st.floats())
    elif kind == "uint64":
        p.uint64_param = draw(st.integers(0, 2**64 - 1))
    return p


@st.composite
def infer_requests(draw: st.DrawFn) -> inference_pb2.ModelInferRequest:
    request = inference_pb2.ModelInferRequest(
        model_name=draw(st.one_of(st.just("mlp"), st.text(max_size=40))),
        model_version=draw(st.sampled_from(["", "default"]) | st.text(max_size=20)),
        id=draw(st.text(max_size=20)),
    )
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.one_of(st.just("x"), st.text(max_size=10))),
            datatype=draw(st.one_of(st.just("FP32"), datatypes)),
            shape=draw(shapes),
        )
        if raw:
            request.raw_input_contents.append(draw(raw_contents))
        else:
            for field in draw(st.lists(st.sampled_from(sorted(typed_values)), max_size=2)):
                getattr(tensor.contents, field).extend(draw(typed_values[field]))
    if raw and draw(st.booleans()):  # a count of raw entries that does not match the inputs
        request.raw_input_contents.append(draw(raw_contents))
    for key in draw(st.lists(param_keys, max_size=draw(st.sampled_from([3, 200])))):
        request.parameters[key].CopyFrom(draw(parameters()))
    for name in draw(st.lists(st.one_of(st.just("y"), st.text(max_size=10)), max_size=3)):
        request.outputs.add(name=name)
    return request


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    """A valid ModelInferRequest's bytes, then truncated / flipped / extended with random bytes
    or unknown fields."""
    x = np.arange(64, dtype=np.float32).reshape(1, 64)
    data = bytearray(build_request("mlp", {"x": x}).SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["append", "unknown-field", "truncate", "flip", "random"]))
        if how == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif how == "unknown-field":
            number = draw(st.integers(20, 2**29 - 1))
            wire = draw(st.sampled_from([0, 1, 2, 5]))
            tag = _varint(number << 3 | wire)
            body = {0: _varint(draw(st.integers(0, 2**64 - 1))), 1: bytes(8), 5: bytes(4)}.get(
                wire, b""
            )
            if wire == 2:
                blob = draw(st.binary(max_size=40))
                body = _varint(len(blob)) + blob
            data += tag + body
        elif how == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif how == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
        else:
            data = bytearray(draw(st.binary(max_size=200)))
    return bytes(data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# ---------------------------------------------------------------------------- helpers


def _target(mesh: LiveMesh, which: str) -> str:
    if which == "gateway":
        return mesh.address
    address = mesh.mesh.nodes[1].direct_address
    assert address
    return str(address)


def _still_serves(mesh: LiveMesh, target: str) -> None:
    """A valid query answers with the model's true output, on every path."""
    x = np.random.default_rng(3).normal(size=(3, 64)).astype(np.float32)
    expected = mlp_expected(mesh.model_path, x)
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(4):  # the gateway alternates copies: tunnel and direct
            code, response = answer(stub.ModelInfer, build_request("mlp", {"x": x}))
            assert code == grpc.StatusCode.OK, response
            np.testing.assert_allclose(decode_response_outputs(response)["y"], expected, rtol=1e-5)


# ---------------------------------------------------------------------------- properties


@pytest.mark.parametrize("which", TARGETS)
def test_random_infer_requests_get_a_precise_status(mesh: LiveMesh, which: str) -> None:
    target = _target(mesh, which)
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)

        @settings(FUZZ, max_examples=150)
        @given(request=infer_requests())
        def check(request: inference_pb2.ModelInferRequest) -> None:
            code, out = answer(stub.ModelInfer, request)
            if code == grpc.StatusCode.OK:
                decode_response_outputs(out)  # an answer is a well-formed one

        check()
    _still_serves(mesh, target)


@pytest.mark.parametrize("which", TARGETS)
def test_undecodable_bytes_and_unknown_fields(mesh: LiveMesh, which: str) -> None:
    target = _target(mesh, which)
    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)

        @settings(FUZZ, max_examples=100)
        @given(data=corrupted())
        def check(data: bytes) -> None:
            code, out = answer(infer, data)
            if code == grpc.StatusCode.OK:
                inference_pb2.ModelInferResponse.FromString(out)

        check()
        # Unknown fields alone are skipped, as protobuf requires: the query is answered.
        valid = build_request("mlp", {"x": np.zeros((1, 64), np.float32)}).SerializeToString()
        code, _ = answer(infer, valid + _varint(999 << 3 | 2) + b"\x03abc")
        assert code == grpc.StatusCode.OK
        code, message = answer(infer, b"\xff\xff\xff\xff")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not decode" in message
    _still_serves(mesh, target)


@pytest.mark.parametrize("which", TARGETS)
def test_undecodable_stream_messages_are_answered_in_stream(mesh: LiveMesh, which: str) -> None:
    """ModelStreamInfer: a message that does not decode gets an INVALID_ARGUMENT answer in the
    stream, and the stream goes on to answer the next (valid) request."""
    valid = build_request("mlp", {"x": np.zeros((1, 64), np.float32)}, request_id="ok")
    with grpc.insecure_channel(_target(mesh, which)) as channel:
        stream = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)
        replies = [
            inference_pb2.ModelStreamInferResponse.FromString(r)
            for r in stream(iter([b"\xff\xff\xff", valid.SerializeToString()]), timeout=10)
        ]
    errors = [r.error_message for r in replies if r.error_message]
    assert len(replies) == 2 and len(errors) == 1, replies
    assert errors[0].startswith("INVALID_ARGUMENT: "), errors
    assert any(r.infer_response.id == "ok" for r in replies if not r.error_message)


@pytest.mark.parametrize("which", TARGETS)
def test_enormous_declared_shapes_are_refused_before_allocation(mesh: LiveMesh, which: str) -> None:
    """A declared 2**40-element tensor (4 TiB of FP32) is refused at once, whatever its
    encoding: nothing is allocated for the declared size."""
    rss = mesh.rss()
    with grpc.insecure_channel(_target(mesh, which)) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for shape in ([2**40], [2**40, 64], [1, 2**40], [2**20, 2**20, 0, 7], [2**62] * 3):
            for raw in (True, False):
                request = build_request("mlp", {"x": np.zeros((1, 64), np.float32)}, raw=raw)
                request.inputs[0].shape[:] = shape
                code, message = answer(stub.ModelInfer, request, within_s=1.0)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, message
                assert "too large" in message, message
    assert mesh.rss() - rss < 64 << 20


def test_a_query_too_big_for_the_tunnel_does_not_cut_the_node_off(mesh: LiveMesh) -> None:
    """A request just under the message limit no longer fits once framed for the tunnel: it is
    refused, and the node's stream (every other query on it) survives."""
    with grpc.insecure_channel(mesh.address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for slack in (400, 60, 30, 8):
            request = build_request(
                "mlp", {"x": np.zeros((1, 64), np.float32)}, parameters={"pad": ""}
            )
            request.parameters["pad"].string_param = "a" * (
                MAX_MESSAGE - slack - request.ByteSize()
            )
            answer(stub.ModelInfer, request)
    assert mesh.on_loop(lambda: "edge" in mesh.mesh.cp.hub.sessions)  # type: ignore[union-attr]
    _still_serves(mesh, mesh.address)


def test_memory_stays_bounded_after_the_run(mesh: LiveMesh) -> None:
    """Last in the module: after every hostile request above, the process (control plane and
    nodes share it) grew by less than a bound."""
    _still_serves(mesh, mesh.address)
    growth = mesh.rss() - mesh.baseline_rss
    assert growth < 256 << 20, f"RSS grew by {growth >> 20} MiB"
