"""Drift sketches: fixed-bin histograms of input features and of a model's output, and the
distances between them. Shared by the node (counts its queries into windows), the control plane
(scores windows against a reference) and ``meshctl model profile`` (builds the reference).

Contract:

* A reference :class:`~meshserve.protos.mesh_pb2.DriftProfile` fixes the bins: per input feature the
  interior ``edges`` (ascending, unique; a value ``v`` falls in bin ``#edges <= v``, so NaN falls
  in bin 0), and for the output either edges (a numeric output) or none (classes: the count at
  index ``i`` is of class ``i``; classes beyond :data:`MAX_CLASSES` - 1 count as the last one).
* :class:`Binner` counts a batch of rows into those bins, vectorised over features. Counting is
  the only per-query work on the node; raw values never leave it, only counts do.
* :func:`psi` is the population stability index ``sum((c - r) * ln(c / r))`` over bins of the two
  normalised histograms, with every bin smoothed by ``eps`` (so an empty bin is finite);
  :func:`ks` is the largest gap between the two cumulative histograms (a two-sample
  Kolmogorov-Smirnov distance on the bins). Both are 0 for identical distributions. Histograms of
  different lengths (class counts) are padded with zeros.

Pure: numpy only, no I/O. Importing it has no side effects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from meshserve.protos import mesh_pb2

__all__ = [
    "MAX_CLASSES",
    "MAX_FEATURES",
    "Binner",
    "build_profile",
    "class_counts",
    "features_of",
    "ks",
    "merge_counts",
    "monitoring_digest",
    "prediction_of",
    "psi",
]

#: Classes an output sketch distinguishes; higher class ids share the last bin.
MAX_CLASSES = 64
#: Features a profile may describe (bounds the sketch bytes a node sends per window).
MAX_FEATURES = 256
_EPS = 1e-4


def features_of(array: NDArray[Any]) -> NDArray[np.float64]:
    """An input tensor as (rows, features): its non-batch values flattened, as float64."""
    if array.ndim == 0:
        return np.asarray(array, dtype=np.float64).reshape(1, 1)
    rows = array.shape[0]
    return np.asarray(array, dtype=np.float64).reshape(rows, -1)


def prediction_of(output: NDArray[Any]) -> tuple[NDArray[Any], bool]:
    """Per-row predictions from one output tensor and whether they are classes.

    Integer outputs are class labels; a float output of shape (rows, k>1) is scores (argmax is the
    class); any other float output is a value (its first column)."""
    if output.dtype.kind in "iub":
        return output.reshape(output.shape[0] if output.ndim else 1, -1)[:, 0], True
    if output.dtype.kind == "f":
        if output.ndim == 2 and output.shape[1] > 1:
            return np.argmax(output, axis=1), True
        flat = output.reshape(output.shape[0] if output.ndim else 1, -1)
        return flat[:, 0].astype(np.float64), False
    return np.zeros(output.shape[0] if output.ndim else 1, dtype=np.int64), True


def _quantile_edges(column: NDArray[np.float64], bins: int) -> list[float]:
    finite = column[np.isfinite(column)]
    if finite.size == 0:
        return []
    qs = np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    return [float(e) for e in np.unique(qs)]


def build_profile(
    inputs: NDArray[Any],
    predictions: NDArray[Any] | None,
    *,
    input_name: str,
    classes: bool = True,
    bins: int = 10,
    source: str = "",
) -> mesh_pb2.DriftProfile:
    """A reference profile from a sample: quantile bins per feature of ``inputs`` (rows first)
    and the distribution of ``predictions`` (class ids, or values binned the same way)."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    matrix = features_of(inputs)
    if matrix.shape[1] > MAX_FEATURES:
        raise ValueError(
            f"input {input_name!r} has {matrix.shape[1]} features; a profile holds at most "
            f"{MAX_FEATURES}"
        )
    profile = mesh_pb2.DriftProfile(input=input_name, rows=matrix.shape[0], source=source)
    for j in range(matrix.shape[1]):
        profile.features.add(name=f"{input_name}[{j}]", edges=_quantile_edges(matrix[:, j], bins))
    binner = Binner(profile)
    for sketch, counts in zip(profile.features, binner.count_features(matrix), strict=True):
        sketch.counts.extend(int(c) for c in counts)
    if predictions is not None:
        values = np.asarray(predictions)
        if classes:
            profile.output.name = "class"
            profile.output.counts.extend(int(c) for c in class_counts(values))
        else:
            column = values.astype(np.float64).reshape(-1)
            profile.output.name = "value"
            profile.output.edges.extend(_quantile_edges(column, bins))
            profile.output.counts.extend(int(c) for c in Binner(profile).count_output(column))
    return profile


def class_counts(classes: NDArray[Any]) -> NDArray[np.int64]:
    """Counts per class id (negative ids count as 0, ids >= MAX_CLASSES as the last)."""
    ids = np.clip(np.asarray(classes, dtype=np.int64).reshape(-1), 0, MAX_CLASSES - 1)
    return np.bincount(ids, minlength=0).astype(np.int64)


class Binner:
    """Counts rows into a profile's bins (one binary search per feature column)."""

    def __init__(self, profile: mesh_pb2.DriftProfile) -> None:
        self.input = profile.input
        self.n_features = len(profile.features)
        self._feature_edges = [np.array(s.edges, dtype=np.float64) for s in profile.features]
        self.output_edges = np.array(profile.output.edges, dtype=np.float64)
        self.output_classes = len(profile.output.edges) == 0

    def zeros(self) -> list[NDArray[np.int64]]:
        """Empty per-feature counts (one zero per bin)."""
        return [np.zeros(len(edges) + 1, dtype=np.int64) for edges in self._feature_edges]

    def count_features(self, matrix: NDArray[np.float64]) -> list[NDArray[np.int64]]:
        """Per feature, counts per bin of ``matrix`` (rows, n_features)."""
        if self.n_features == 0:
            return []
        if matrix.shape[1] != self.n_features:
            raise ValueError(
                f"rows have {matrix.shape[1]} features, the profile has {self.n_features}"
            )
        columns = np.ascontiguousarray(matrix.T)
        return [
            np.bincount(
                np.searchsorted(edges, column, side="right"), minlength=len(edges) + 1
            ).astype(np.int64)
            for edges, column in zip(self._feature_edges, columns, strict=True)
        ]

    def count_output(self, values: NDArray[Any]) -> NDArray[np.int64]:
        """Counts of predictions: per class id, or per bin of the output edges."""
        if self.output_classes:
            return class_counts(values)
        column = np.asarray(values, dtype=np.float64).reshape(-1)
        idx = np.searchsorted(self.output_edges, column, side="right")
        return np.bincount(idx, minlength=len(self.output_edges) + 1).astype(np.int64)


def _normalised(a: Sequence[int] | NDArray[Any], b: Sequence[int] | NDArray[Any]) -> Any:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    n = max(x.size, y.size)
    x = np.pad(x, (0, n - x.size))
    y = np.pad(y, (0, n - y.size))
    if x.sum() <= 0 or y.sum() <= 0:
        return None
    return x / x.sum(), y / y.sum()


def psi(reference: Sequence[int] | NDArray[Any], current: Sequence[int] | NDArray[Any]) -> float:
    """Population stability index of ``current`` against ``reference`` (counts per bin)."""
    pair = _normalised(reference, current)
    if pair is None:
        return 0.0
    r, c = pair
    r = (r + _EPS) / (1 + _EPS * r.size)
    c = (c + _EPS) / (1 + _EPS * c.size)
    return float(np.sum((c - r) * np.log(c / r)))


def ks(reference: Sequence[int] | NDArray[Any], current: Sequence[int] | NDArray[Any]) -> float:
    """Largest gap between the cumulative histograms (0..1)."""
    pair = _normalised(reference, current)
    if pair is None:
        return 0.0
    r, c = pair
    return float(np.max(np.abs(np.cumsum(r) - np.cumsum(c))))


def add_counts(total: NDArray[np.int64], counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Element-wise sum of two count vectors of possibly different lengths (the shorter one
    padded with zeros)."""
    if total.size < counts.size:
        total = np.pad(total, (0, counts.size - total.size))
    elif counts.size < total.size:
        counts = np.pad(counts, (0, total.size - counts.size))
    return total + counts


# A count a node sends is untrusted (uint64 on the wire): each is capped here, far above any
# real window yet small enough that sums of many windows stay exact in int64.
_MAX_COUNT = 2**53


def merge_counts(parts: Sequence[Sequence[int]]) -> list[int]:
    """Element-wise sum of count vectors of possibly different lengths; each count is capped at
    :data:`_MAX_COUNT` (a hostile uint64 must neither overflow int64 nor wrap the sum)."""
    total = np.zeros(0, dtype=np.int64)
    for p in parts:
        counts = np.minimum(np.asarray(p, dtype=np.uint64), _MAX_COUNT).astype(np.int64)
        total = add_counts(total, counts)
    return [int(v) for v in total]


def monitoring_digest(
    monitoring: mesh_pb2.MonitoringConfig, reference: mesh_pb2.DriftProfile
) -> str:
    """A short fingerprint of a copy's monitoring settings ("" when none are set): the control
    plane re-sends them to a node whose copy reports another digest."""
    config = monitoring.SerializeToString(deterministic=True)
    ref = reference.SerializeToString(deterministic=True)
    if not config and not ref:
        return ""
    import hashlib

    return hashlib.blake2b(config + b"\0" + ref, digest_size=8).hexdigest()
