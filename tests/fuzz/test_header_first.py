"""The header-before-decode rule: a request's inputs are checked against the model from their
headers (names, datatypes, shapes, byte counts) before any contents are decoded.

Properties, on random datatype / shape / byte-count mismatches:
- the pure check (:func:`~meshserve.common.codec.check_request_inputs`) refuses every mismatch
  with INVALID_ARGUMENT (never another error), before looking at the contents (a mismatch with
  garbage contents is refused for the mismatch, not for the garbage), copying at most one raw
  input; what it lets through decodes to exactly the declared elements, BYTES at most
  :data:`~meshserve.common.codec.MAX_BYTES_ELEMENTS`;
- a live mesh (gateway and the node's own port) answers every mismatch INVALID_ARGUMENT quickly,
  and its memory stays bounded.
"""

from __future__ import annotations

import struct
import tracemalloc
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.common.codec import (
    DATATYPES,
    DECODE_OFF_LOOP_BYTES,
    MAX_BYTES_ELEMENTS,
    build_request,
    check_request_inputs,
    decode_request_inputs,
    decode_response_outputs,
)
from meshserve.common.datatypes import TABLE
from meshserve.common.errors import InvalidArgument
from meshserve.protos import inference_pb2, inference_pb2_grpc
from tests.fuzz._support import FUZZ, LiveMesh, answer, mlp_expected


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


MLP = (Spec("x", "FP32", (-1, 64)),)
MODELS = [MLP, (Spec("ids", "INT64", (-1, -1)), Spec("text", "BYTES", (-1,)))]

datatypes = st.one_of(st.sampled_from(sorted(DATATYPES)), st.text(max_size=8))
dims = st.one_of(st.sampled_from([0, 1, 2, 3, 64, -1, 2**31, 2**40]), st.integers(-2, 70))


@st.composite
def headers(draw: st.DrawFn) -> tuple[tuple[Spec, ...], inference_pb2.ModelInferRequest, bool]:
    """A model's inputs, a request for them with random mismatches (datatype, shape, byte
    count, names), and whether the request's header matches the model (the oracle)."""
    model = draw(st.sampled_from(MODELS))
    request = inference_pb2.ModelInferRequest(model_name="m")
    raw = draw(st.booleans())
    matches = True
    for spec in model:
        if draw(st.integers(0, 9)) == 0:  # left out
            matches = False
            continue
        name = spec.name if draw(st.integers(0, 9)) else draw(st.text(max_size=5))
        datatype = spec.datatype if draw(st.booleans()) else draw(datatypes)
        if draw(st.booleans()):
            shape = [d if d != -1 else draw(st.integers(0, 4)) for d in spec.shape]
        else:
            shape = draw(st.lists(dims, max_size=4))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        valid_shape = len(shape) == len(spec.shape) and all(
            w in (-1, g) and g >= 0 for w, g in zip(spec.shape, shape, strict=True)
        )
        count = int(np.prod(shape)) if valid_shape else 0
        small = count <= 4096  # contents that fit the header are built only for small counts
        matches &= name == spec.name and datatype == spec.datatype and valid_shape
        itemsize = TABLE[spec.datatype].itemsize
        if raw:
            if spec.datatype == "BYTES" and small:
                element = draw(st.binary(max_size=3))
                good = (struct.pack("<I", len(element)) + element) * count
            elif small:
                good = bytes(count * (itemsize or 1))
            else:
                good = b""
            contents = good if small and draw(st.booleans()) else draw(st.binary(max_size=600))
            if itemsize is not None and len(contents) != count * itemsize:
                matches = False
            request.raw_input_contents.append(contents)
        elif spec.datatype == "BYTES":
            values = draw(st.lists(st.binary(max_size=3), min_size=0, max_size=9))
            fit = small and draw(st.booleans())
            tensor.contents.bytes_contents.extend([b""] * count if fit else values)
            matches &= len(tensor.contents.bytes_contents) == count
        else:
            field = TABLE[spec.datatype].contents_field
            assert field is not None
            n = count if small and draw(st.booleans()) else draw(st.integers(0, 70))
            getattr(tensor.contents, field).extend([0] * n)
            matches &= n == count
    return model, request, matches


def _checked(model: tuple[Spec, ...], request: inference_pb2.ModelInferRequest) -> bool:
    """Whether the header check lets ``request`` through (InvalidArgument: not; any other
    error fails the test)."""
    try:
        check_request_inputs(request, model)
    except InvalidArgument as exc:
        assert exc.message
        return False
    return True


@settings(FUZZ, max_examples=400)
@given(case=headers())
def test_every_header_mismatch_is_refused_and_what_passes_decodes_as_declared(
    case: tuple[tuple[Spec, ...], inference_pb2.ModelInferRequest, bool],
) -> None:
    model, request, matches = case
    passed = _checked(model, request)
    if not matches:
        assert not passed, "a header mismatch got through to decoding"
        return
    if not passed:
        return  # e.g. BYTES contents too short for their prefixes: refused, fine
    try:
        inputs = decode_request_inputs(request)
    except InvalidArgument:
        return  # malformed contents (BYTES prefixes): refused by the decoder, precisely
    for tensor in request.inputs:
        declared = int(np.prod(list(tensor.shape)))
        assert inputs[tensor.name].size == declared
        if tensor.datatype == "BYTES":
            assert declared <= MAX_BYTES_ELEMENTS


@settings(FUZZ, max_examples=100)
@given(datatype=datatypes.filter(lambda d: d != "FP32"), garbage=st.binary(max_size=64))
def test_a_datatype_mismatch_is_refused_for_the_datatype_not_for_the_contents(
    datatype: str, garbage: bytes
) -> None:
    request = inference_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype=datatype, shape=[1, 64])
    request.raw_input_contents.append(garbage)
    with pytest.raises(InvalidArgument, match="the model expects FP32"):
        check_request_inputs(request, MLP)


@pytest.mark.parametrize(
    ("datatype", "shape", "spec"),
    [
        ("BYTES", [156_250, 64], MLP),  # the 57 MiB case: BYTES to an FP32 model
        ("BYTES", [MAX_BYTES_ELEMENTS + 1], (Spec("text", "BYTES", (-1,)),)),
        ("FP32", [2**20, 64], MLP),  # 256 MiB declared, 4 bytes sent
    ],
)
def test_a_huge_declared_tensor_costs_the_check_almost_nothing(
    datatype: str, shape: list[int], spec: tuple[Spec, ...]
) -> None:
    """Refused from the header; the check allocates at most one copy of one raw input (its
    length is read) plus a few KiB, whatever the header declares."""
    request = inference_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name=spec[0].name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(b"\x02\x00\x00\x00ab" * 1000)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument):
            check_request_inputs(request, spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(request.raw_input_contents[0]) + (64 << 10), peak


# ------------------------------------------------------------------- on a live mesh


def _target(mesh: LiveMesh, which: str) -> str:
    if which == "gateway":
        return mesh.address
    return str(mesh.mesh.nodes[1].direct_address)


@st.composite
def mismatched_mlp(draw: st.DrawFn) -> inference_pb2.ModelInferRequest:
    """A query for ``mlp`` whose one input mismatches its header (datatype, shape or bytes)."""
    request = build_request("mlp", {"x": np.zeros((1, 64), np.float32)})
    tensor = request.inputs[0]
    kind = draw(st.sampled_from(["datatype", "shape", "bytes"]))
    if kind == "datatype":
        tensor.datatype = draw(datatypes.filter(lambda d: d != "FP32"))
    elif kind == "shape":
        shape = draw(st.lists(dims, max_size=4).filter(lambda s: s != [1, 64]))
        tensor.shape[:] = shape
    else:
        size = draw(st.integers(0, 1024).filter(lambda n: n != 256))
        request.raw_input_contents[0] = bytes(size)
    return request


@pytest.mark.parametrize("which", ["gateway", "direct"])
def test_header_mismatches_get_invalid_argument_on_every_path(mesh: LiveMesh, which: str) -> None:
    rss = mesh.rss()
    with grpc.insecure_channel(_target(mesh, which)) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)

        @settings(FUZZ, max_examples=120)
        @given(request=mismatched_mlp())
        def check(request: Any) -> None:
            code, message = answer(
                stub.ModelInfer, request, allowed=frozenset({grpc.StatusCode.INVALID_ARGUMENT})
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT, message

        check()
    assert mesh.rss() - rss < 64 << 20


@pytest.mark.parametrize("which", ["gateway", "direct"])
def test_a_large_valid_query_decoded_off_the_loop_is_answered_right(
    mesh: LiveMesh, which: str
) -> None:
    """2,048 rows (512 KiB, over ``DECODE_OFF_LOOP_BYTES``): decoded on a worker thread, the
    answer is the model's."""
    x = np.random.default_rng(11).normal(size=(2048, 64)).astype(np.float32)
    assert x.nbytes > DECODE_OFF_LOOP_BYTES
    with grpc.insecure_channel(_target(mesh, which)) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        code, response = answer(stub.ModelInfer, build_request("mlp", {"x": x}))
    assert code == grpc.StatusCode.OK, response
    expected = mlp_expected(mesh.model_path, x)
    np.testing.assert_allclose(decode_response_outputs(response)["y"], expected, rtol=1e-5)
