"""Triton's model configuration of an ONNX model, from the tensors its file declares.

Gateways and nodes answer Triton's ``ModelConfig`` call (the model configuration extension) with
:func:`model_config`: a pure function of the model's name, its input and output tensors (name, OIP
datatype, shape with -1 for a dynamic dimension: what onnxruntime reads from the ONNX file, as a
node reports them in its copy status, or as registered) and the row cap of its batcher.

The configuration is derived, never stored: platform ``onnxruntime_onnx``, backend
``onnxruntime``; ``max_batch_size`` follows Triton's convention: when every input and output has a
dynamic first dimension (the batch axis; the node's dynamic batcher uses the same rule), it is the
row cap of the node's batcher (the variant's ``serving.batching.max_batch_size``, default 32) and
each tensor's ``dims`` leave the batch dimension out; otherwise it is 0 and ``dims`` are the full
shape. A request with more rows than the cap still runs (as one batch of its own).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Final

from meshserve.common.codec import TensorSpec as Tensor  # what is read of a tensor
from meshserve.protos import inference_pb2

__all__ = [
    "BACKEND",
    "DEFAULT_MAX_BATCH",
    "PLATFORM",
    "TRITON_TYPES",
    "Tensor",
    "batch_axis",
    "model_config",
    "triton_type",
]

PLATFORM: Final = "onnxruntime_onnx"
BACKEND: Final = "onnxruntime"
#: The node batcher's row cap when a variant's serving config sets none.
DEFAULT_MAX_BATCH: Final = 32

#: OIP datatype name -> Triton's ``DataType`` (``BYTES`` is Triton's ``TYPE_STRING``).
TRITON_TYPES: Final[Mapping[str, inference_pb2.DataType]] = MappingProxyType(
    {
        "BOOL": inference_pb2.TYPE_BOOL,
        "UINT8": inference_pb2.TYPE_UINT8,
        "UINT16": inference_pb2.TYPE_UINT16,
        "UINT32": inference_pb2.TYPE_UINT32,
        "UINT64": inference_pb2.TYPE_UINT64,
        "INT8": inference_pb2.TYPE_INT8,
        "INT16": inference_pb2.TYPE_INT16,
        "INT32": inference_pb2.TYPE_INT32,
        "INT64": inference_pb2.TYPE_INT64,
        "FP16": inference_pb2.TYPE_FP16,
        "FP32": inference_pb2.TYPE_FP32,
        "FP64": inference_pb2.TYPE_FP64,
        "BYTES": inference_pb2.TYPE_STRING,
        "BF16": inference_pb2.TYPE_BF16,
    }
)


def triton_type(datatype: str) -> inference_pb2.DataType:
    """Triton's ``DataType`` of an OIP datatype name (``TYPE_INVALID`` for an unknown one)."""
    return TRITON_TYPES.get(datatype, inference_pb2.TYPE_INVALID)


def batch_axis(inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> bool:
    """True when every input and output has rank >= 1 and a dynamic (-1) first dimension."""
    shapes = [list(t.shape) for t in (*inputs, *outputs)]
    return bool(inputs) and bool(outputs) and all(s and s[0] == -1 for s in shapes)


def model_config(
    name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor], max_batch: int = 0
) -> inference_pb2.ModelConfig:
    """The Triton configuration of model ``name`` (see the module docstring); ``max_batch``:
    the batcher's row cap (0: :data:`DEFAULT_MAX_BATCH`)."""
    batched = batch_axis(inputs, outputs)
    skip = 1 if batched else 0
    return inference_pb2.ModelConfig(
        name=name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=(max_batch or DEFAULT_MAX_BATCH) if batched else 0,
        input=[
            inference_pb2.ModelInput(
                name=t.name, data_type=triton_type(t.datatype), dims=list(t.shape)[skip:]
            )
            for t in inputs
        ],
        output=[
            inference_pb2.ModelOutput(
                name=t.name, data_type=triton_type(t.datatype), dims=list(t.shape)[skip:]
            )
            for t in outputs
        ],
    )
