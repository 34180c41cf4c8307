"""Tests for meshserve.common.codec: numpy <-> Open Inference Protocol tensors."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshserve.common import codec
from meshserve.common.errors import InvalidArgument
from meshserve.protos.inference_pb2 import (
    InferParameter,
    InferTensorContents,
    ModelInferRequest,
    ModelInferResponse,
)

FIXED = [name for name in codec.DATATYPES if name != "BYTES"]
TYPED_FIXED = [name for name in FIXED if name != "FP16"]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
BYTES_ARRAYS = hnp.arrays(np.object_, SHAPES, elements=st.binary(max_size=6))
NAME = "tensor_q"

fast = settings(max_examples=20, deadline=None)


def _raw(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _check_equal(decoded: Any, original: Any) -> None:
    assert decoded.shape == original.shape
    assert decoded.dtype == codec.numpy_dtype(codec.datatype_of(original))
    np.testing.assert_array_equal(decoded, original)


def _round_trip(array: Any, raw: bool) -> Any:
    datatype, shape, contents, data = codec.encode_tensor(array, raw=raw)
    assert (contents is None) == raw and (data is None) == (not raw)
    return codec.decode_tensor(NAME, datatype, shape, contents=contents, raw=data)


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", FIXED)
@fast
@given(data=st.data())
def test_raw_round_trip(datatype: str, data: st.DataObject) -> None:
    array = data.draw(hnp.arrays(codec.DATATYPES[datatype], SHAPES))
    assert codec.datatype_of(array) == datatype
    _check_equal(_round_trip(array, raw=True), array)


@pytest.mark.parametrize("datatype", TYPED_FIXED)
@fast
@given(data=st.data())
def test_typed_round_trip(datatype: str, data: st.DataObject) -> None:
    array = data.draw(hnp.arrays(codec.DATATYPES[datatype], SHAPES))
    _check_equal(_round_trip(array, raw=False), array)


@pytest.mark.parametrize("raw", [True, False])
@fast
@given(array=BYTES_ARRAYS)
def test_bytes_round_trip(raw: bool, array: Any) -> None:
    assert codec.datatype_of(array) == "BYTES"
    decoded = _round_trip(array, raw=raw)
    assert decoded.dtype == object and decoded.shape == array.shape
    assert decoded.ravel().tolist() == array.ravel().tolist()


@pytest.mark.parametrize("raw", [True, False])
def test_bytes_from_strings_and_empty_elements(raw: bool) -> None:
    array = np.array([["héllo", ""], ["x", "\u2603"]])
    decoded = _round_trip(array, raw=raw)
    assert decoded.tolist() == [[b"h\xc3\xa9llo", b""], [b"x", "\u2603".encode()]]
    mixed = np.array(["a", b"\x00\xff", b""], dtype=object)
    assert _round_trip(mixed, raw=raw).tolist() == [b"a", b"\x00\xff", b""]


def test_bytes_raw_layout() -> None:
    _, shape, _, data = codec.encode_tensor(np.array([b"ab", b""], dtype=object))
    assert shape == [2] and data == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


def test_scalar_and_empty() -> None:
    scalar = np.float32(2.5)
    datatype, shape, _, data = codec.encode_tensor(np.asarray(scalar))
    assert (datatype, shape, len(data or b"")) == ("FP32", [], 4)
    assert codec.decode_tensor(NAME, "FP32", [], raw=data).item() == 2.5
    assert codec.decode_tensor(NAME, "INT64", [3, 0], raw=b"").shape == (3, 0)
    assert codec.decode_tensor(NAME, "BYTES", [0], contents=InferTensorContents()).shape == (0,)


def test_raw_is_little_endian_and_zero_copy() -> None:
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    _, _, _, data = codec.encode_tensor(big)
    assert data == np.arange(6, dtype="<i4").tobytes()
    decoded = codec.decode_tensor(NAME, "INT32", [2, 3], raw=data)
    assert not decoded.flags.owndata and not decoded.flags.writeable
    np.testing.assert_array_equal(decoded, big)


def test_typed_uses_the_datatype_field() -> None:
    _, _, contents, _ = codec.encode_tensor(np.array([1, 2], dtype=np.uint16), raw=False)
    assert contents is not None and list(contents.uint_contents) == [1, 2]
    assert [f.name for f, _ in contents.ListFields()] == ["uint_contents"]


@pytest.mark.parametrize("raw", [True, False])
def test_request_response_round_trip(raw: bool) -> None:
    inputs = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([True, False]),
        "c": np.array([b"x", b""], dtype=object),
        "d": np.zeros((0, 2), dtype=np.int8),
    }
    request = codec.build_request(
        "m", inputs, outputs=["y"], version="2", request_id="r1", parameters={"k": 3}, raw=raw
    )
    assert (request.model_name, request.model_version, request.id) == ("m", "2", "r1")
    assert [o.name for o in request.outputs] == ["y"]
    assert len(request.raw_input_contents) == (4 if raw else 0)
    request = ModelInferRequest.FromString(request.SerializeToString())
    decoded = codec.decode_request_inputs(request)
    assert list(decoded) == list(inputs)
    for name, array in inputs.items():
        _check_equal(decoded[name], array)
    assert codec.get_parameter(request.parameters["k"]) == 3

    response = ModelInferResponse(model_name="m")
    codec.encode_response_outputs(response, inputs, raw=raw)
    response = ModelInferResponse.FromString(response.SerializeToString())
    outputs = codec.decode_response_outputs(response)
    for name, array in inputs.items():
        _check_equal(outputs[name], array)


# -- validation -------------------------------------------------------------------------------


def _dec(datatype: str, shape: list[int], raw: bytes | None = None, **typed: Any) -> object:
    contents = InferTensorContents(**typed) if typed else None
    return lambda: codec.decode_tensor(NAME, datatype, shape, contents=contents, raw=raw)


BAD: dict[str, tuple[Any, str]] = {
    "unknown datatype": (_dec("FP8", [1], b"\0"), "FP8"),
    "negative dim": (_dec("FP32", [2, -1], b""), "negative"),
    "overflow": (_dec("FP32", [2**40, 2**40, 0], b""), "too large"),
    "too many dims": (_dec("INT8", [1] * 40, b"\0"), "dimensions"),
    "raw length": (
        _dec("FP32", [2, 2], b"\0" * 12),
        f"input '{NAME}': raw contents are 12 bytes, expected 16 for FP32 [2, 2]",
    ),
    "typed count": (_dec("FP32", [2, 2], fp32_contents=[1.0]), "1 values, expected 4"),
    "wrong field": (_dec("FP32", [1], int64_contents=[1]), "int64_contents"),
    "extra field": (_dec("INT32", [1], int_contents=[1], bool_contents=[1]), "bool_contents"),
    "uint8 range": (_dec("UINT8", [2], uint_contents=[1, 300]), "300"),
    "int8 range": (_dec("INT8", [1], int_contents=[-129]), "-129"),
    "int16 range": (_dec("INT16", [1], int_contents=[40000]), "40000"),
    "uint16 range": (_dec("UINT16", [1], uint_contents=[70000]), "70000"),
    "fp16 typed": (_dec("FP16", [1], fp32_contents=[1.0]), "FP16 tensors must use raw contents"),
    "no source": (_dec("FP32", [0]), "exactly one"),
    "bool raw byte": (_dec("BOOL", [2], b"\x01\x02"), "BOOL"),
    "bytes truncated prefix": (_dec("BYTES", [2], _raw(b"a") + b"\x01\0"), "truncated"),
    "bytes past end": (_dec("BYTES", [1], _raw(b"abc")[:-1]), "past the end"),
    "bytes trailing": (_dec("BYTES", [1], _raw(b"a") + b"\x07"), "trailing"),
    "bytes too few": (_dec("BYTES", [3], _raw(b"a", b"")), "hold 2 elements, expected 3"),
    "bytes too many": (_dec("BYTES", [1], _raw(b"a", b"", b"c")), "hold 3 elements, expected 1"),
}


def test_two_sources_refused() -> None:
    with pytest.raises(InvalidArgument, match=f"'{NAME}': exactly one"):
        codec.decode_tensor(NAME, "FP32", [0], raw=b"", contents=InferTensorContents())


@pytest.mark.parametrize("case", list(BAD))
def test_decode_errors_name_the_tensor(case: str) -> None:
    call, expected = BAD[case]
    with pytest.raises(InvalidArgument) as info:
        call()
    assert f"'{NAME}'" in info.value.message
    assert expected in info.value.message


def _request(raw: list[bytes], *names: str, typed: bool = False) -> ModelInferRequest:
    request = ModelInferRequest(model_name="m", raw_input_contents=raw)
    for name in names:
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1])
        if typed:
            tensor.contents.int_contents.append(7)
    return request


def test_request_level_errors() -> None:
    one = np.int32(1).tobytes()
    with pytest.raises(InvalidArgument, match="raw_input_contents has 1 entries for 2 inputs"):
        codec.decode_request_inputs(_request([one], "a", "b"))
    with pytest.raises(InvalidArgument, match="input 'a': has typed contents"):
        codec.decode_request_inputs(_request([one], "a", typed=True))
    for request in (_request([one, one], "a", "a"), _request([], "a", "a", typed=True)):
        with pytest.raises(InvalidArgument, match="duplicate input 'a'"):
            codec.decode_request_inputs(request)
    with pytest.raises(InvalidArgument, match="input 'a'"):
        codec.decode_request_inputs(_request([b"\0"], "a"))
    assert codec.decode_request_inputs(_request([], "a", typed=True))["a"].tolist() == [7]

    response = ModelInferResponse(raw_output_contents=[one])
    response.outputs.add(name="y", datatype="INT32", shape=[2])
    with pytest.raises(InvalidArgument, match="output 'y': raw contents are 4 bytes"):
        codec.decode_response_outputs(response)
    response.outputs.add(name="z", datatype="INT32", shape=[1])
    with pytest.raises(InvalidArgument, match="raw_output_contents has 1 entries for 2 outputs"):
        codec.decode_response_outputs(response)


def test_encode_errors() -> None:
    half = np.ones(2, dtype=np.float16)
    with pytest.raises(InvalidArgument, match="FP16 tensors must use raw contents"):
        codec.encode_tensor(half, raw=False)
    with pytest.raises(InvalidArgument, match="input 'h': FP16"):
        codec.build_request("m", {"h": half}, raw=False)
    response = ModelInferResponse()
    with pytest.raises(InvalidArgument, match="output 'h': FP16"):
        codec.encode_response_outputs(response, {"h": half}, raw=False)
    assert len(response.outputs) == 0
    with pytest.raises(InvalidArgument, match="complex"):
        codec.datatype_of(np.zeros(2, dtype=np.complex64))
    with pytest.raises(InvalidArgument, match="int"):
        codec.encode_tensor(np.array([b"a", 3], dtype=object))
    with pytest.raises(InvalidArgument, match="'FP128'"):
        codec.numpy_dtype("FP128")


# -- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (True, "bool_param"),
        (False, "bool_param"),
        (-5, "int64_param"),
        (2**63, "uint64_param"),
        (0.25, "double_param"),
        ("s", "string_param"),
    ],
)
def test_parameters(value: Any, field: str) -> None:
    request = ModelInferRequest()
    codec.set_parameter(request.parameters, "k", value)
    param = ModelInferRequest.FromString(request.SerializeToString()).parameters["k"]
    assert param.WhichOneof("parameter_choice") == field
    got = codec.get_parameter(param)
    assert got == value and type(got) is type(value)


def test_parameter_errors() -> None:
    with pytest.raises(InvalidArgument):
        codec.get_parameter(InferParameter())
    with pytest.raises(InvalidArgument, match="'k'"):
        codec.set_parameter(ModelInferRequest().parameters, "k", 2**64)
