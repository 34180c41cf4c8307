"""Tests for meshserve.devtools.demo_models: the models are valid ONNX and run in onnxruntime."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from meshserve.devtools.demo_models import (
    make_fixed_model,
    make_int_model,
    make_mlp,
    reference_outputs,
    sha256_file,
    write_not_onnx,
)


def _check(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_param if d.HasField("dim_param") else d.dim_value
        for d in value_info.type.tensor_type.shape.dim
    ]


def test_mlp_valid_and_signature(tmp_path: Path) -> None:
    path = make_mlp(tmp_path / "mlp.onnx")
    assert path == tmp_path / "mlp.onnx" and path.is_file()
    model = _check(path)
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "x" and out.name == "y"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(inp) == ["batch", 64]
    assert _dims(out) == ["batch", 10]
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]


@pytest.mark.parametrize("batch", [1, 7])
def test_mlp_runs(tmp_path: Path, batch: int) -> None:
    path = make_mlp(tmp_path / "mlp.onnx", in_features=8, hidden=(16,), out_features=3, seed=5)
    _check(path)
    x = np.random.default_rng(1).standard_normal((batch, 8)).astype(np.float32)
    out = reference_outputs(path, {"x": x})
    assert set(out) == {"y"}
    y = out["y"]
    assert y.shape == (batch, 3) and y.dtype == np.float32
    assert np.all(np.isfinite(y))
    # Recompute with numpy from the stored weights.
    model = onnx.load(str(path))
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    h = np.maximum(x @ w["W0"] + w["B0"], 0.0)
    np.testing.assert_allclose(y, h @ w["W1"] + w["B1"], rtol=1e-5, atol=1e-5)


def test_mlp_default_runs_batch_7(tmp_path: Path) -> None:
    path = make_mlp(tmp_path / "mlp.onnx")
    x = np.ones((7, 64), dtype=np.float32)
    y = reference_outputs(path, {"x": x})["y"]
    assert y.shape == (7, 10)
    # Identical rows in, identical rows out.
    np.testing.assert_array_equal(y, np.broadcast_to(y[0], y.shape))


def test_mlp_deterministic(tmp_path: Path) -> None:
    a = make_mlp(tmp_path / "a.onnx", seed=3)
    b = make_mlp(tmp_path / "b.onnx", seed=3)
    c = make_mlp(tmp_path / "c.onnx", seed=4)
    assert sha256_file(a) == sha256_file(b)
    assert sha256_file(a) != sha256_file(c)


def test_mlp_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_mlp(tmp_path / "bad.onnx", hidden=(0,))


@pytest.mark.parametrize("batch", [1, 7])
def test_int_model_exact(tmp_path: Path, batch: int) -> None:
    path = make_int_model(tmp_path / "int.onnx")
    model = _check(path)
    assert [i.name for i in model.graph.input] == ["k"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert _dims(model.graph.input[0]) == ["batch", 4]
    k = np.arange(batch * 4, dtype=np.int64).reshape(batch, 4) - 5
    k[0, 0] = 2**40  # beyond int32: must survive as INT64
    out = reference_outputs(path, {"k": k})
    assert list(out) == ["doubled", "as_float"]
    assert out["doubled"].dtype == np.int64
    assert out["as_float"].dtype == np.float32
    np.testing.assert_array_equal(out["doubled"], k * 2 + 1)
    np.testing.assert_array_equal(out["as_float"], k.astype(np.float32) * np.float32(0.5))


def test_int_model_deterministic(tmp_path: Path) -> None:
    a = make_int_model(tmp_path / "a.onnx")
    b = make_int_model(tmp_path / "b.onnx")
    assert sha256_file(a) == sha256_file(b)


def test_fixed_model(tmp_path: Path) -> None:
    path = make_fixed_model(tmp_path / "fixed.onnx")
    model = _check(path)
    assert _dims(model.graph.input[0]) == [1, 3]
    assert _dims(model.graph.output[0]) == [1, 3]
    x = np.array([[1.0, -2.0, 0.5]], dtype=np.float32)
    out = reference_outputs(path, {"x": x})
    np.testing.assert_array_equal(out["y"], x + 1)
    # No batch axis: a batch of 7 is rejected.
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises its own exception types
        reference_outputs(path, {"x": np.zeros((7, 3), dtype=np.float32)})


def test_not_onnx_fails_to_load(tmp_path: Path) -> None:
    path = write_not_onnx(tmp_path / "junk.onnx")
    assert path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime raises its own exception types
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_sha256_file_streams(tmp_path: Path) -> None:
    data = bytes(range(256)) * (5 * 4096 + 3)  # > 5 MiB, not a multiple of the chunk size
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()
