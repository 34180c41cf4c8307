"""Tensor codec for the Open Inference Protocol v2, shared by the SDK and the node.

Converts between numpy arrays and OIP tensors, in either of the protocol's two encodings:

* **raw**: one little-endian byte string per tensor (``raw_input_contents`` /
  ``raw_output_contents``). ``BYTES`` elements are each a 4-byte little-endian length followed by
  the element's bytes. Decoding is zero-copy for fixed-width types (the array may be read-only).
* **typed**: the values in the :class:`InferTensorContents` field for the datatype. ``FP16`` has
  no typed field and must use raw contents.

Every decoding error is an :class:`~meshserve.common.errors.InvalidArgument` whose message names the
tensor, e.g. ``input 'x': raw contents are 12 bytes, expected 16 for FP32 [2, 2]``.

The datatype table itself (dtypes, typed fields, ONNX types) is :mod:`meshserve.common.datatypes`;
``DATATYPES``, ``datatype_of`` and ``numpy_dtype`` are re-exported here.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Final, Protocol

import numpy as np
from numpy.typing import NDArray

from meshserve.common.datatypes import DATATYPES, TABLE, datatype_of, numpy_dtype
from meshserve.common.errors import InvalidArgument
from meshserve.protos.inference_pb2 import (
    InferParameter,
    InferTensorContents,
    ModelInferRequest,
    ModelInferResponse,
)

__all__ = [
    "DATATYPES",
    "DECODE_OFF_LOOP_BYTES",
    "MAX_BYTES_ELEMENTS",
    "MAX_DIMS",
    "MAX_ELEMENTS",
    "ParameterValue",
    "TensorSpec",
    "build_request",
    "check_request_inputs",
    "datatype_of",
    "decode_request_inputs",
    "decode_response_outputs",
    "decode_tensor",
    "encode_response_outputs",
    "encode_tensor",
    "get_parameter",
    "numpy_dtype",
    "set_parameter",
]

ParameterValue = bool | int | float | str

#: Most dimensions a tensor may have (numpy's limit on every supported version).
MAX_DIMS: Final = 32
#: Most elements a tensor may declare; a protobuf message cannot exceed 2 GiB anyway. Zero-size
#: tensors are held to the same bound on the product of their non-zero dimensions.
MAX_ELEMENTS: Final = 2**31
#: Most elements a BYTES tensor may hold: each is a Python object once decoded (~50 bytes of
#: overhead, a loop step to split), so 1 Mi elements cost ~0.1 GiB and ~0.5 s of a worker
#: thread; more is refused from the header, before any decode. Text batches are far smaller.
MAX_BYTES_ELEMENTS: Final = 1 << 20
#: A request whose input payload exceeds this many bytes is decoded on a worker thread, not on
#: the serving event loop (smaller ones decode faster than the hand-off).
DECODE_OFF_LOOP_BYTES: Final = 256 << 10

_LEN: Final = struct.Struct("<I")


def _element_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return bytes(value)  # np.bytes_ -> bytes
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidArgument(f"BYTES elements must be bytes or str, got {type(value).__name__}")


def _typed_field(datatype: str) -> str:
    """The ``InferTensorContents`` field of a datatype that has one (every one but FP16)."""
    field = TABLE[datatype].contents_field
    assert field is not None, datatype
    return field


def _fill_contents(arr: NDArray[Any], datatype: str, contents: InferTensorContents) -> None:
    if datatype == "FP16":
        raise InvalidArgument("FP16 tensors must use raw contents")
    field = getattr(contents, _typed_field(datatype))
    if datatype == "BYTES":
        field.extend([_element_bytes(v) for v in arr.ravel().tolist()])
    else:
        field.extend(arr.ravel().tolist())


def _raw_bytes(arr: NDArray[Any], datatype: str) -> bytes:
    if datatype != "BYTES":
        dt = DATATYPES[datatype].newbyteorder("<")
        return np.ascontiguousarray(arr, dtype=dt).tobytes()
    parts: list[bytes] = []
    for value in arr.ravel().tolist():
        data = _element_bytes(value)
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_tensor(
    array: NDArray[Any], *, raw: bool = True
) -> tuple[str, list[int], InferTensorContents | None, bytes | None]:
    """Encode ``array`` as ``(datatype, shape, typed contents or None, raw bytes or None)``."""
    arr = np.asarray(array)
    datatype = datatype_of(arr)
    shape = [int(d) for d in arr.shape]
    if raw:
        return datatype, shape, None, _raw_bytes(arr, datatype)
    contents = InferTensorContents()
    _fill_contents(arr, datatype, contents)
    return datatype, shape, contents, None


def _describe(datatype: str, shape: Sequence[int]) -> str:
    return f"{datatype} {list(shape)}"


def _element_count(label: str, shape: Sequence[int]) -> int:
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"{label}: shape has {len(shape)} dimensions, at most {MAX_DIMS}")
    count = 1
    nonzero = 1
    for dim in shape:
        if dim < 0:
            raise InvalidArgument(f"{label}: negative dimension in shape {list(shape)}")
        count *= dim
        if dim:
            nonzero *= dim
            if nonzero > MAX_ELEMENTS:
                raise InvalidArgument(
                    f"{label}: shape {list(shape)} is too large (over {MAX_ELEMENTS} elements)"
                )
    return count


def _count_elements(raw: bytes, offset: int) -> int | None:
    """How many well-formed length-prefixed elements fill ``raw[offset:]``; None if malformed."""
    count = 0
    while offset < len(raw):
        if len(raw) - offset < 4:
            return None
        (length,) = _LEN.unpack_from(raw, offset)
        offset += 4 + length
        if offset > len(raw):
            return None
        count += 1
    return count


def _split_bytes(label: str, raw: bytes, count: int) -> list[bytes]:
    """Split Triton-style length-prefixed BYTES raw contents into exactly ``count`` elements."""
    view = memoryview(raw)
    total = len(raw)
    items: list[bytes] = []
    offset = 0
    while offset < total:
        if len(items) == count:
            extra = _count_elements(raw, offset)
            if extra is None:
                raise InvalidArgument(
                    f"{label}: {total - offset} trailing bytes after the last of {count} "
                    "BYTES elements"
                )
            raise InvalidArgument(
                f"{label}: BYTES raw contents hold {count + extra} elements, expected {count}"
            )
        if total - offset < 4:
            raise InvalidArgument(
                f"{label}: BYTES raw contents have a truncated length prefix at byte {offset}"
            )
        (length,) = _LEN.unpack_from(raw, offset)
        offset += 4
        if length > total - offset:
            raise InvalidArgument(
                f"{label}: BYTES element {len(items)} at byte {offset - 4} has length {length}, "
                f"past the end of the {total}-byte raw contents"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidArgument(
            f"{label}: BYTES raw contents hold {len(items)} elements, expected {count}"
        )
    return items


def _object_array(items: list[bytes], shape: Sequence[int]) -> NDArray[Any]:
    arr = np.empty(len(items), dtype=np.object_)
    arr[:] = items
    return arr.reshape(tuple(shape))


def _decode_raw(
    label: str, datatype: str, shape: Sequence[int], count: int, raw: bytes
) -> NDArray[Any]:
    if datatype == "BYTES":
        return _object_array(_split_bytes(label, raw, count), shape)
    dt = DATATYPES[datatype].newbyteorder("<")
    expected = count * dt.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"{label}: raw contents are {len(raw)} bytes, expected {expected} for "
            f"{_describe(datatype, shape)}"
        )
    if datatype == "BOOL" and count and np.frombuffer(raw, dtype=np.uint8).max() > 1:
        raise InvalidArgument(f"{label}: BOOL raw contents must be bytes 0 or 1")
    return np.frombuffer(raw, dtype=dt).reshape(tuple(shape))


def _decode_typed(
    label: str,
    datatype: str,
    shape: Sequence[int],
    count: int,
    contents: InferTensorContents,
) -> NDArray[Any]:
    if datatype == "FP16":
        raise InvalidArgument(f"{label}: FP16 tensors must use raw contents")
    expected_field = _typed_field(datatype)
    for descriptor, _ in contents.ListFields():
        if descriptor.name != expected_field:
            raise InvalidArgument(
                f"{label}: {datatype} values must be in {expected_field}, got {descriptor.name}"
            )
    field = getattr(contents, expected_field)
    if len(field) != count:
        raise InvalidArgument(
            f"{label}: typed contents hold {len(field)} values, expected {count} for "
            f"{_describe(datatype, shape)}"
        )
    if datatype == "BYTES":
        return _object_array(list(field), shape)
    dt = DATATYPES[datatype]
    if TABLE[datatype].narrow:
        wide = np.array(field, dtype=np.int64)
        info = np.iinfo(dt)
        bad = (wide < info.min) | (wide > info.max)
        if bad.any():
            value = int(wide[np.argmax(bad)])
            raise InvalidArgument(f"{label}: value {value} is out of range for {datatype}")
        return wide.astype(dt).reshape(tuple(shape))
    return np.array(field, dtype=dt).reshape(tuple(shape))


def decode_tensor(
    name: str,
    datatype: str,
    shape: Sequence[int],
    *,
    contents: InferTensorContents | None = None,
    raw: bytes | None = None,
    kind: str = "input",
) -> NDArray[Any]:
    """Decode one tensor from exactly one of typed ``contents`` or ``raw`` bytes.

    ``kind`` ("input" or "output") only prefixes error messages: ``input 'x': ...``.
    """
    label = f"{kind} {name!r}"
    if (contents is None) == (raw is None):
        raise InvalidArgument(f"{label}: exactly one of typed contents and raw contents is needed")
    if datatype not in DATATYPES:
        raise InvalidArgument(f"{label}: unknown datatype {datatype!r}")
    shape = [int(d) for d in shape]
    count = _element_count(label, shape)
    if raw is not None:
        return _decode_raw(label, datatype, shape, count, raw)
    assert contents is not None
    return _decode_typed(label, datatype, shape, count, contents)


def _decode_all(
    kind: str,
    tensors: Sequence[Any],  # InferInputTensor or InferOutputTensor messages
    raw_contents: Sequence[bytes],
    raw_field: str,
) -> dict[str, NDArray[Any]]:
    if raw_contents and len(raw_contents) != len(tensors):
        raise InvalidArgument(
            f"{raw_field} has {len(raw_contents)} entries for {len(tensors)} {kind}s"
        )
    result: dict[str, NDArray[Any]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.name in result:
            raise InvalidArgument(f"duplicate {kind} {tensor.name!r}")
        if raw_contents:
            if tensor.contents.ListFields():
                raise InvalidArgument(
                    f"{kind} {tensor.name!r}: has typed contents while {raw_field} is used"
                )
            result[tensor.name] = decode_tensor(
                tensor.name, tensor.datatype, tensor.shape, raw=raw_contents[index], kind=kind
            )
        else:
            result[tensor.name] = decode_tensor(
                tensor.name, tensor.datatype, tensor.shape, contents=tensor.contents, kind=kind
            )
    return result


class TensorSpec(Protocol):
    """What a model declares of one input: its name, datatype and shape (-1: any size)."""

    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...


def check_request_inputs(request: ModelInferRequest, expected: Sequence[TensorSpec]) -> int:
    """Check the request's inputs against the model's from their headers alone, before any
    decoding: names (unknown, duplicate, missing), datatypes, shapes (rank and fixed sizes),
    and the contents' size (raw: shape x element size bytes, BYTES at least a 4-byte prefix per
    element and at most :data:`MAX_BYTES_ELEMENTS` elements; typed: one value per element).
    Costs O(tensors + dimensions), never O(contents). Raises InvalidArgument naming the first
    mismatch; returns the input payload in bytes (the caller decides where to decode it)."""
    by_name = {t.name: t for t in expected}
    inputs = request.inputs
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw_contents)} entries for {len(inputs)} inputs"
        )
    seen: set[str] = set()
    payload = 0
    for index, tensor in enumerate(inputs):
        name = tensor.name
        label = f"input {name!r}"
        if name in seen:
            raise InvalidArgument(f"duplicate input {name!r}")
        seen.add(name)
        spec = by_name.get(name)
        if spec is None:
            names = ", ".join(sorted(by_name))
            raise InvalidArgument(f"unknown input {name!r}; the model expects: {names}")
        datatype = tensor.datatype
        if datatype != spec.datatype:
            shown = datatype if datatype in DATATYPES else repr(datatype[:32])
            raise InvalidArgument(
                f"{label} has datatype {shown}, the model expects {spec.datatype}"
            )
        shape = list(tensor.shape)
        count = _element_count(label, shape)
        want = list(spec.shape)
        if len(shape) != len(want) or any(
            w not in (-1, g) for w, g in zip(want, shape, strict=True)
        ):
            raise InvalidArgument(
                f"{label} has shape {shape}, the model expects {want} (-1 = any size)"
            )
        if datatype == "BYTES" and count > MAX_BYTES_ELEMENTS:
            raise InvalidArgument(
                f"{label}: {count} BYTES elements, at most {MAX_BYTES_ELEMENTS} per tensor"
            )
        if raw_contents:
            raw = raw_contents[index]
            itemsize = TABLE[datatype].itemsize
            if itemsize is not None and len(raw) != count * itemsize:
                raise InvalidArgument(
                    f"{label}: raw contents are {len(raw)} bytes, expected {count * itemsize} "
                    f"for {_describe(datatype, shape)}"
                )
            if itemsize is None and len(raw) < 4 * count:
                raise InvalidArgument(
                    f"{label}: BYTES raw contents are {len(raw)} bytes, too short for {count} "
                    "length-prefixed elements"
                )
            payload += len(raw)
        elif datatype != "FP16":  # FP16 without raw contents is refused by the decoder
            held = len(getattr(tensor.contents, _typed_field(datatype)))
            if held != count:
                raise InvalidArgument(
                    f"{label}: typed contents hold {held} values, expected {count} for "
                    f"{_describe(datatype, shape)}"
                )
            payload += 8 * count
    for spec in expected:
        if spec.name not in seen:
            raise InvalidArgument(
                f"missing input {spec.name!r} ({spec.datatype} {list(spec.shape)})"
            )
    return payload


def decode_request_inputs(request: ModelInferRequest) -> dict[str, NDArray[Any]]:
    """The request's inputs by name, from ``raw_input_contents`` if present, else typed."""
    return _decode_all("input", request.inputs, request.raw_input_contents, "raw_input_contents")


def decode_response_outputs(response: ModelInferResponse) -> dict[str, NDArray[Any]]:
    """The response's outputs by name, from ``raw_output_contents`` if present, else typed."""
    return _decode_all(
        "output", response.outputs, response.raw_output_contents, "raw_output_contents"
    )


def _append_tensors(
    kind: str,
    tensors: Any,
    raw_contents: Any,
    arrays: Mapping[str, NDArray[Any]],
    raw: bool,
) -> None:
    for name, array in arrays.items():
        arr = np.asarray(array)
        try:
            datatype = datatype_of(arr)
            data = _raw_bytes(arr, datatype) if raw else None
            tensor = tensors.add(name=name, datatype=datatype, shape=arr.shape)
            if data is not None:
                raw_contents.append(data)
            else:
                try:
                    _fill_contents(arr, datatype, tensor.contents)
                except BaseException:
                    del tensors[-1]
                    raise
        except InvalidArgument as exc:
            raise InvalidArgument(f"{kind} {name!r}: {exc.message}") from None


def encode_response_outputs(
    response: ModelInferResponse, outputs: Mapping[str, NDArray[Any]], *, raw: bool = True
) -> None:
    """Append ``outputs`` to ``response`` (``raw_output_contents``, or typed contents)."""
    _append_tensors("output", response.outputs, response.raw_output_contents, outputs, raw)


def build_request(
    model: str,
    inputs: Mapping[str, NDArray[Any]],
    *,
    outputs: Sequence[str] | None = None,
    version: str = "",
    request_id: str = "",
    parameters: Mapping[str, ParameterValue] | None = None,
    raw: bool = True,
) -> ModelInferRequest:
    """A ``ModelInferRequest`` for ``model`` carrying ``inputs`` (raw contents by default)."""
    request = ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for key, value in (parameters or {}).items():
        set_parameter(request.parameters, key, value)
    _append_tensors("input", request.inputs, request.raw_input_contents, inputs, raw)
    for output in outputs or ():
        request.outputs.add(name=output)
    return request


def set_parameter(
    params_map: MutableMapping[str, InferParameter], key: str, value: ParameterValue
) -> None:
    """Set ``params_map[key]`` (a protobuf parameters map) to ``value``.

    Integers use ``int64_param``, or ``uint64_param`` when above the int64 range.
    """
    param = params_map[key]  # message maps create the entry on access
    if isinstance(value, bool | np.bool_):
        param.bool_param = bool(value)
    elif isinstance(value, int | np.integer):
        number = int(value)
        if -(2**63) <= number < 2**63:
            param.int64_param = number
        elif 0 <= number < 2**64:
            param.uint64_param = number
        else:
            raise InvalidArgument(f"parameter {key!r}: {number} does not fit in 64 bits")
    elif isinstance(value, float | np.floating):
        param.double_param = float(value)
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise InvalidArgument(f"parameter {key!r}: unsupported value type {type(value).__name__}")


def get_parameter(param: InferParameter) -> ParameterValue:
    """The Python value of an ``InferParameter``."""
    choice = param.WhichOneof("parameter_choice")
    if choice is None:
        raise InvalidArgument("parameter has no value set")
    value: ParameterValue = getattr(param, choice)
    return value
