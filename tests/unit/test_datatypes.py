"""Tests for meshserve.common.datatypes: the one OIP datatype table, checked against the real
onnx, onnxruntime and protobuf definitions it names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor

from meshserve.common import codec, datatypes
from meshserve.common.datatypes import BY_ONNX_TYPE, BY_ORT_TYPE, DATATYPES, TABLE
from meshserve.protos.inference_pb2 import InferTensorContents

# The Open Inference Protocol v2 tensor datatypes meshserve serves (all of them but BF16).
OIP_NAMES = {
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
}


def test_table_names_every_oip_datatype_once() -> None:
    assert set(TABLE) == OIP_NAMES
    assert all(row.name == name for name, row in TABLE.items())
    assert set(DATATYPES) == OIP_NAMES
    assert sorted(BY_ORT_TYPE.values()) == sorted(OIP_NAMES)
    assert sorted(BY_ONNX_TYPE.values()) == sorted(OIP_NAMES)
    assert codec.DATATYPES is DATATYPES  # the codec re-exports the table, no copy


@pytest.mark.parametrize(
    "mapping", [TABLE, DATATYPES, BY_ORT_TYPE, BY_ONNX_TYPE], ids=["table", "dtypes", "ort", "onnx"]
)
def test_mappings_are_read_only(mapping: object) -> None:
    with pytest.raises(TypeError):
        mapping["FP32"] = None  # type: ignore[index]


def test_itemsize_is_the_raw_width_and_bytes_has_none() -> None:
    for name, row in TABLE.items():
        if name == "BYTES":
            assert row.itemsize is None and row.dtype == np.dtype(object)
        else:
            assert row.itemsize == row.dtype.itemsize
            assert datatypes.datatype_of(np.zeros(2, dtype=row.dtype)) == name


def test_contents_fields_exist_cover_the_message_and_mark_narrow_types() -> None:
    fields = {f.name: f for f in InferTensorContents.DESCRIPTOR.fields}
    used = {row.contents_field for row in TABLE.values()} - {None}
    assert used == set(fields)  # every typed field belongs to some datatype
    assert [name for name, row in TABLE.items() if row.contents_field is None] == ["FP16"]
    bits = {
        FieldDescriptor.TYPE_INT32: 32,
        FieldDescriptor.TYPE_UINT32: 32,
        FieldDescriptor.TYPE_INT64: 64,
        FieldDescriptor.TYPE_UINT64: 64,
        FieldDescriptor.TYPE_FLOAT: 32,
        FieldDescriptor.TYPE_DOUBLE: 64,
    }
    for name, row in TABLE.items():
        if row.contents_field is None or name in ("BOOL", "BYTES"):
            assert not row.narrow, name
            continue
        width = bits[fields[row.contents_field].type]
        assert width >= row.dtype.itemsize * 8, name  # the field can hold every value
        # narrow: the field is wider, so decoding must range-check each value
        assert row.narrow == (width > row.dtype.itemsize * 8), name


def test_onnx_types_match_the_onnx_package() -> None:
    onnx = pytest.importorskip("onnx")
    for name, row in TABLE.items():
        assert onnx.helper.tensor_dtype_to_np_dtype(row.onnx_type) == (
            np.dtype(object) if name == "BYTES" else row.dtype
        ), name


def test_ort_types_are_what_onnxruntime_reports(tmp_path: Path) -> None:
    """An Identity model per datatype, loaded in onnxruntime: its input's type string maps back
    to the datatype (the node's runtime reads a model's tensors this way)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper

    for name, row in TABLE.items():
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            f"identity_{name.lower()}",
            [helper.make_tensor_value_info("x", row.onnx_type, [2])],
            [helper.make_tensor_value_info("y", row.onnx_type, [2])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        reported = session.get_inputs()[0].type
        assert reported == row.ort_type, name
        assert BY_ORT_TYPE[reported] == name
