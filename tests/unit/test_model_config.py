"""Triton's model configuration from a model's tensors (common/model_config.py, pure)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshserve.common.datatypes import DATATYPES
from meshserve.common.model_config import TRITON_TYPES, batch_axis, model_config, triton_type
from meshserve.protos import inference_pb2


@dataclass(frozen=True)
class T:
    name: str
    datatype: str
    shape: tuple[int, ...]


def test_every_oip_datatype_has_tritons_type() -> None:
    assert set(DATATYPES) <= set(TRITON_TYPES)
    assert set(TRITON_TYPES) - set(DATATYPES) <= {"BF16"}  # an OIP name the table lacks today
    for name in TRITON_TYPES:
        expected = "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}"
        assert inference_pb2.DataType.Name(triton_type(name)) == expected
    assert triton_type("NOPE") == inference_pb2.TYPE_INVALID


def test_batch_axis_drops_the_first_dimension() -> None:
    config = model_config(
        "m", [T("x", "FP32", (-1, 64))], [T("y", "INT64", (-1, 10)), T("z", "BYTES", (-1,))], 8
    )
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [64])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("y", inference_pb2.TYPE_INT64, [10]),
        ("z", inference_pb2.TYPE_STRING, []),
    ]
    assert (
        model_config("m", [T("x", "FP32", (-1, 4))], [T("y", "FP32", (-1,))]).max_batch_size == 32
    )


@pytest.mark.parametrize(
    ("inputs", "outputs"),
    [
        ([T("x", "FP32", (1, 3))], [T("y", "FP32", (1, 3))]),  # fixed shapes
        ([T("x", "FP32", (-1, 3))], [T("y", "FP32", (1, 3))]),  # an output without the axis
        ([T("x", "FP32", ())], [T("y", "FP32", (-1,))]),  # a scalar input
        ([], [T("y", "FP32", (-1,))]),  # no inputs
    ],
)
def test_no_batch_axis_keeps_full_dims(inputs: list[T], outputs: list[T]) -> None:
    assert not batch_axis(inputs, outputs)
    config = model_config("m", inputs, outputs, 8)
    assert config.max_batch_size == 0
    assert [list(i.dims) for i in config.input] == [list(t.shape) for t in inputs]
    assert [list(o.dims) for o in config.output] == [list(t.shape) for t in outputs]
