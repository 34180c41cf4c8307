"""Builders for small, real ONNX models used in demos, benchmarks and tests.

Every builder writes a self-contained ``.onnx`` file (weights embedded) made with the
``onnx.helper`` API and returns its path. Weights come from ``numpy.random.default_rng(seed)``,
so the same arguments always produce byte-identical files, hence the same sha256
(:func:`~meshserve.common.digest.sha256_file`, re-exported here).

``onnx`` and ``onnxruntime`` are imported lazily inside the functions: importing this module
has no side effects and does not pull either library in.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from meshserve.common.digest import sha256_file  # re-exported: tests and bench hash with it

__all__ = [
    "DIGITS_VARIANTS",
    "IR_VERSION",
    "OPSET",
    "FamilyMember",
    "digits_split",
    "make_digits_family",
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


# -- a real model family: scikit-learn's digits, three variants ------------------------------

#: The digits family's variants, cheapest first.
DIGITS_VARIANTS = ("fast", "medium", "accurate")
#: Bump when a recipe below changes, so cached files are rebuilt.
_DIGITS_RECIPE = 2
_DIGITS_TEST_SIZE = 0.3


@dataclass(frozen=True)
class FamilyMember:
    """One variant of a model family written by :func:`make_digits_family`.

    ``accuracy`` is measured on the held-out split by running the ONNX file with onnxruntime;
    ``mean_ms_per_query`` is the mean in-process onnxruntime run time at batch 1 (one intra-op
    thread, as a node runs it) on this machine.
    """

    name: str
    path: Path
    accuracy: float
    mean_ms_per_query: float


def digits_split(
    seed: int = 0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[Any], npt.NDArray[Any]]:
    """``(x_train, x_test, y_train, y_test)`` of scikit-learn's ``load_digits``.

    Stratified 70/30 split with ``random_state=seed``; images are FP32 ``[n, 64]`` (pixel values
    0..16), labels int64 ``[n]``. The test split is the one :func:`make_digits_family` measures
    accuracy on.
    """
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_DIGITS_TEST_SIZE, stratify=y, random_state=seed
    )
    return x_tr, x_te, y_tr, y_te


def _digits_estimators(seed: int) -> dict[str, Any]:
    """The (unfitted) scikit-learn estimator per variant; see :func:`make_digits_family`."""
    from sklearn.ensemble import BaggingClassifier, RandomForestClassifier  # type: ignore[import-untyped]
    from sklearn.neural_network import MLPClassifier  # type: ignore[import-untyped]
    from sklearn.svm import SVC  # type: ignore[import-untyped]

    return {
        "fast": RandomForestClassifier(n_estimators=10, max_depth=6, random_state=seed),
        "medium": MLPClassifier(hidden_layer_sizes=(512, 256), max_iter=1000, random_state=seed),
        "accurate": BaggingClassifier(
            SVC(gamma=0.001, probability=True, random_state=seed),
            n_estimators=200,
            random_state=seed,
        ),
    }


def _digits_versions(seed: int) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import skl2onnx  # type: ignore[import-untyped]
    import sklearn  # type: ignore[import-untyped]

    return {
        "recipe": _DIGITS_RECIPE,
        "seed": seed,
        "test_size": _DIGITS_TEST_SIZE,
        "sklearn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def digits_to_onnx(clf: Any, path: Path) -> Path:
    """Write a fitted digits classifier as ONNX: input ``x`` FP32 ``[None, 64]``, outputs
    ``label`` (int64) and ``probabilities`` (FP32, no ZipMap). Written atomically."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType  # type: ignore[import-untyped]

    onx = to_onnx(
        clf,
        initial_types=[("x", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset=OPSET,
    )
    tmp = path.with_suffix(".onnx.tmp")
    tmp.write_bytes(onx.SerializeToString())
    tmp.replace(path)
    return path


def _digits_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # skl2onnx graphs carry an unused initializer: no warning
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_accuracy(session: Any, x: npt.NDArray[np.float32], y: npt.NDArray[Any]) -> float:
    label = session.run(["label"], {"x": x})[0]
    return float(np.mean(np.asarray(label).ravel() == y))


def _mean_ms_per_query(
    session: Any, x: npt.NDArray[np.float32], *, max_queries: int = 300, max_s: float = 1.5
) -> float:
    """Mean batch-1 run time over up to ``max_queries`` test images (capped at ``max_s``)."""
    for i in range(5):  # warm-up
        session.run(None, {"x": x[i : i + 1]})
    total, n = 0.0, 0
    stop = time.perf_counter() + max_s
    while n < max_queries and time.perf_counter() < stop:
        row = x[n % len(x)][None, :]
        t0 = time.perf_counter()
        session.run(None, {"x": row})
        total += time.perf_counter() - t0
        n += 1
    return total / n * 1000.0


def make_digits_family(directory: Path, *, seed: int = 0) -> list[FamilyMember]:
    """Train, convert and measure a three-variant family on scikit-learn's digits.

    Variants (cheapest first, see :data:`DIGITS_VARIANTS`), each written to
    ``directory/digits-<name>.onnx``:

    * ``fast``: a random forest of 10 trees of depth 6 (a few microseconds, ~0.9 accuracy);
    * ``medium``: an MLP with hidden layers (512, 256);
    * ``accurate``: 200 bagged RBF SVCs with probabilities, averaged (several milliseconds per
      query on a 2-core machine, the best accuracy of the three).

    Data: :func:`digits_split` with ``seed`` (stratified 70/30). Every model is converted with
    skl2onnx to input ``x`` FP32 ``[None, 64]`` and outputs ``label`` (int64 ``[None]``) and
    ``probabilities`` (FP32 ``[None, 10]``; no ZipMap). ``accuracy`` is measured by running the
    ONNX file with onnxruntime on the test split; ``mean_ms_per_query`` is measured on every call
    (it depends on the machine). Files are reused when ``directory/digits-family.json`` records
    the same seed, recipe and library versions and every file's SHA-256 still matches; otherwise
    they are rebuilt (training takes about a minute on 2 cores).
    """

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "digits-family.json"
    versions = _digits_versions(seed)
    x_tr, x_te, y_tr, y_te = digits_split(seed)
    paths = {name: directory / f"digits-{name}.onnx" for name in DIGITS_VARIANTS}

    cached: dict[str, Any] = {}
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("versions") == versions and all(
            paths[n].is_file() and sha256_file(paths[n]) == meta["variants"][n]["sha256"]
            for n in DIGITS_VARIANTS
        ):
            cached = meta["variants"]
    except (OSError, ValueError, KeyError, TypeError):
        cached = {}

    accuracies: dict[str, float] = {}
    if cached:
        accuracies = {n: float(cached[n]["accuracy"]) for n in DIGITS_VARIANTS}
    else:
        for name, clf in _digits_estimators(seed).items():
            with warnings.catch_warnings():  # SVC(probability=True) is deprecated in 1.9
                warnings.simplefilter("ignore", FutureWarning)
                clf.fit(x_tr, y_tr)
                digits_to_onnx(clf, paths[name])
            accuracies[name] = _onnx_accuracy(_digits_session(paths[name]), x_te, y_te)
        meta = {
            "versions": versions,
            "variants": {
                n: {"sha256": sha256_file(paths[n]), "accuracy": accuracies[n]}
                for n in DIGITS_VARIANTS
            },
        }
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")

    members = []
    for name in DIGITS_VARIANTS:
        session = _digits_session(paths[name])
        ms = _mean_ms_per_query(session, x_te)
        members.append(FamilyMember(name, paths[name], accuracies[name], ms))
    return members
