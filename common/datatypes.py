"""The Open Inference Protocol datatype table: kept once, for the SDK, the node, the control plane
and the benchmarks.

One :class:`Datatype` row per OIP v2 datatype name (``BOOL`` ... ``BYTES``) says:

* ``dtype``: the numpy dtype, native byte order. ``BYTES`` is an object array of ``bytes``.
* ``itemsize``: bytes per element in raw contents (little-endian on the wire), or ``None`` for
  ``BYTES``, whose raw elements are each a 4-byte little-endian length and the element's bytes.
* ``contents_field``: the ``InferTensorContents`` field that carries typed values, or ``None``
  for ``FP16``, which only raw contents can carry. ``narrow`` marks datatypes narrower than that
  field (``INT8`` in ``int_contents``), whose typed values must be range-checked on decode.
* ``onnx_type`` and ``ort_type``: the same element type as an ONNX ``TensorProto.DataType``
  value and as onnxruntime's type string (``tensor(float)``).

Every mapping here is read-only and built from literals: importing this module imports numpy and
the error model only (no protobuf, no onnx), so any tool can use the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from meshserve.common.errors import InvalidArgument

__all__ = [
    "BY_ONNX_TYPE",
    "BY_ORT_TYPE",
    "DATATYPES",
    "TABLE",
    "Datatype",
    "datatype_of",
    "numpy_dtype",
]


@dataclass(frozen=True, slots=True)
class Datatype:
    """One OIP datatype and its names elsewhere (see the module docstring)."""

    name: str
    dtype: np.dtype[Any]
    itemsize: int | None
    contents_field: str | None
    narrow: bool
    onnx_type: int
    ort_type: str


def _row(
    name: str, dtype: Any, field: str | None, onnx_type: int, ort: str, *, narrow: bool = False
) -> Datatype:
    dt = np.dtype(dtype)
    size = None if dt.kind == "O" else dt.itemsize
    return Datatype(name, dt, size, field, narrow, onnx_type, f"tensor({ort})")


#: OIP datatype name -> its row. ONNX values are ``onnx.TensorProto.DataType`` (a unit test pins
#: them against the onnx package).
TABLE: Final[Mapping[str, Datatype]] = MappingProxyType(
    {
        row.name: row
        for row in (
            _row("BOOL", np.bool_, "bool_contents", 9, "bool"),
            _row("UINT8", np.uint8, "uint_contents", 2, "uint8", narrow=True),
            _row("UINT16", np.uint16, "uint_contents", 4, "uint16", narrow=True),
            _row("UINT32", np.uint32, "uint_contents", 12, "uint32"),
            _row("UINT64", np.uint64, "uint64_contents", 13, "uint64"),
            _row("INT8", np.int8, "int_contents", 3, "int8", narrow=True),
            _row("INT16", np.int16, "int_contents", 5, "int16", narrow=True),
            _row("INT32", np.int32, "int_contents", 6, "int32"),
            _row("INT64", np.int64, "int64_contents", 7, "int64"),
            _row("FP16", np.float16, None, 10, "float16"),
            _row("FP32", np.float32, "fp32_contents", 1, "float"),
            _row("FP64", np.float64, "fp64_contents", 11, "double"),
            _row("BYTES", np.object_, "bytes_contents", 8, "string"),
        )
    }
)

#: OIP datatype name -> numpy dtype (native byte order). ``BYTES`` is an object array of ``bytes``.
DATATYPES: Final[Mapping[str, np.dtype[Any]]] = MappingProxyType(
    {name: row.dtype for name, row in TABLE.items()}
)
#: onnxruntime type string (``NodeArg.type``, e.g. ``tensor(float)``) -> OIP datatype name.
BY_ORT_TYPE: Final[Mapping[str, str]] = MappingProxyType(
    {row.ort_type: name for name, row in TABLE.items()}
)
#: ONNX ``TensorProto.DataType`` value -> OIP datatype name.
BY_ONNX_TYPE: Final[Mapping[int, str]] = MappingProxyType(
    {row.onnx_type: name for name, row in TABLE.items()}
)
_BY_KIND_SIZE: Final[Mapping[tuple[str, int], str]] = MappingProxyType(
    {(row.dtype.kind, row.dtype.itemsize): name for name, row in TABLE.items() if row.itemsize}
)


def datatype_of(array: NDArray[Any]) -> str:
    """The OIP datatype for ``array``'s dtype (str, bytes and object arrays are ``BYTES``);
    InvalidArgument for a dtype with none (complex, datetime, ...)."""
    dt = np.asarray(array).dtype
    if dt.kind in "USO":
        return "BYTES"
    name = _BY_KIND_SIZE.get((dt.kind, dt.itemsize))
    if name is None:
        raise InvalidArgument(f"unsupported dtype {dt} (no Open Inference Protocol datatype)")
    return name


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype for an OIP datatype name; InvalidArgument for an unknown name."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise InvalidArgument(f"unknown datatype {datatype!r}") from None
