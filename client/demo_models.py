"""Builders for small, real ONNX models used in demos, benchmarks and tests.

Every builder writes a self-contained ``.onnx`` file (weights embedded) made with the
``onnx.helper`` API and returns its path. Weights come from ``numpy.random.default_rng(seed)``,
so the same arguments always produce byte-identical files (see :func:`sha256_file`).

``onnx`` and ``onnxruntime`` are imported lazily inside the functions: importing this module
has no side effects and does not pull either library in.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "IR_VERSION",
    "OPSET",
    "make_fixed_model",
    "make_int_model",
    "make_mlp",
    "reference_outputs",
    "sha256_file",
    "write_not_onnx",
]

#: Default-domain opset the models are built against.
OPSET = 17
#: ONNX IR version written into the models (IR 8 pairs with opset 17; onnxruntime reads it).
IR_VERSION = 8

_CHUNK = 1 << 20
_NOT_ONNX = b"this is not an onnx model\n" * 10


def _save(model: Any, path: str | os.PathLike[str]) -> Path:
    """Check ``model`` with the ONNX checker and write it to ``path`` (parents created)."""
    import onnx

    onnx.checker.check_model(model, full_check=True)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.SerializeToString())
    return out


def _model(graph: Any, producer: str) -> Any:
    """Wrap ``graph`` in a ModelProto with this module's opset and IR version."""
    from onnx import helper

    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=producer,
    )
    model.ir_version = IR_VERSION
    return model


def make_mlp(
    path: str | os.PathLike[str],
    in_features: int = 64,
    hidden: Sequence[int] = (256, 256),
    out_features: int = 10,
    seed: int = 0,
) -> Path:
    """Write a multilayer perceptron (Gemm + Relu per hidden layer, final Gemm) to ``path``.

    Input ``x``: FP32 ``["batch", in_features]``; output ``y``: FP32
    ``["batch", out_features]`` (logits, no softmax). The batch axis is symbolic, so any batch
    size is accepted. Weights are He-scaled normals from ``numpy.random.default_rng(seed)``;
    biases are small normals from the same generator.
    """
    from onnx import TensorProto, helper, numpy_helper

    if in_features <= 0 or out_features <= 0 or any(h <= 0 for h in hidden):
        raise ValueError("layer sizes must be positive")
    rng = np.random.default_rng(seed)
    sizes = [in_features, *hidden, out_features]
    nodes: list[Any] = []
    inits: list[Any] = []
    current = "x"
    n_layers = len(sizes) - 1
    for i in range(n_layers):
        fan_in, fan_out = sizes[i], sizes[i + 1]
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        inits.append(numpy_helper.from_array(w, name=f"W{i}"))
        inits.append(numpy_helper.from_array(b, name=f"B{i}"))
        last = i == n_layers - 1
        gemm_out = "y" if last else f"h{i}_lin"
        nodes.append(
            helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [gemm_out], name=f"gemm{i}")
        )
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"h{i}"], name=f"relu{i}"))
            current = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])],
        initializer=inits,
    )
    return _save(_model(graph, "meshserve.demo_models.mlp"), path)


def make_int_model(path: str | os.PathLike[str]) -> Path:
    """Write a model with an INT64 input to ``path``.

    Input ``k``: INT64 ``["batch", 4]``. Outputs ``doubled``: INT64 ``k * 2 + 1`` and
    ``as_float``: FP32 ``Cast(k) * 0.5``, both ``["batch", 4]``.
    """
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array(2, dtype=np.int64), name="two"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), name="one"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), name="half"),
    ]
    nodes = [
        helper.make_node("Mul", ["k", "two"], ["k2"], name="mul2"),
        helper.make_node("Add", ["k2", "one"], ["doubled"], name="add1"),
        helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["kf", "half"], ["as_float"], name="mulhalf"),
    ]
    graph = helper.make_graph(
        nodes,
        "int_model",
        [helper.make_tensor_value_info("k", TensorProto.INT64, ["batch", 4])],
        [
            helper.make_tensor_value_info("doubled", TensorProto.INT64, ["batch", 4]),
            helper.make_tensor_value_info("as_float", TensorProto.FLOAT, ["batch", 4]),
        ],
        initializer=inits,
    )
    return _save(_model(graph, "meshserve.demo_models.int"), path)


def make_fixed_model(path: str | os.PathLike[str]) -> Path:
    """Write a model with a fixed-shape input (no batch axis) to ``path``.

    Input ``x``: FP32 ``[1, 3]``; output ``y``: FP32 ``[1, 3]`` = ``x + 1``.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"], name="add1")],
        "fixed_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[numpy_helper.from_array(np.array(1.0, dtype=np.float32), name="one")],
    )
    return _save(_model(graph, "meshserve.demo_models.fixed"), path)


def write_not_onnx(path: str | os.PathLike[str]) -> Path:
    """Write bytes that are not an ONNX model to ``path`` (for load-failure tests)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(_NOT_ONNX)
    return out


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 digest of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def reference_outputs(
    path: str | os.PathLike[str], inputs: Mapping[str, npt.NDArray[Any]]
) -> dict[str, npt.NDArray[Any]]:
    """Run the model at ``path`` in-process on onnxruntime's CPU provider.

    ``inputs`` maps input names to arrays; the result maps every model output name to its
    array, in the model's output order.
    """
    import onnxruntime as ort

    session: Any = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names: list[str] = [o.name for o in session.get_outputs()]
    values: list[Any] = session.run(names, dict(inputs))
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}
