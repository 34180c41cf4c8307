"""The row algebra of batching: which requests may share a batch, and how a batch is joined and
split back.

Contract:

* :func:`signature` keys a request by its input names, dtypes and non-batch dimensions (requests
  with equal signatures may be concatenated on axis 0) and counts its rows; a request with no
  input, a scalar input, or inputs of different row counts is :class:`InvalidArgument`.
* :func:`join` concatenates the inputs of same-signature requests on axis 0, in order (one
  request: its own arrays, no copy).
* :func:`split` cuts a batch's outputs back by row counts: part ``i`` holds views of exactly the
  rows of request ``i``. An output without that leading dimension is a :class:`RuntimeError`
  (the model does not batch as its signature claims).
* :func:`has_batch_axis` says whether a model's declared shapes allow batching at all.
* Pure functions of arrays; no state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from meshserve.common.errors import InvalidArgument

__all__ = ["Signature", "Tensors", "has_batch_axis", "join", "signature", "split"]

Tensors = dict[str, NDArray[Any]]
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


def has_batch_axis(
    input_shapes: Sequence[Sequence[int]], output_shapes: Sequence[Sequence[int]]
) -> bool:
    """True when every input and output has rank >= 1 and a dynamic (-1) first dimension."""
    shapes = [*input_shapes, *output_shapes]
    return (
        bool(input_shapes)
        and bool(output_shapes)
        and all(len(s) >= 1 and s[0] == -1 for s in shapes)
    )


def signature(inputs: Mapping[str, NDArray[Any]]) -> tuple[Signature, int]:
    """The batching key of ``inputs`` and their row count."""
    if not inputs:
        raise InvalidArgument("a batched request needs at least one input")
    rows: int | None = None
    sig = []
    for name, arr in inputs.items():
        if arr.ndim == 0:
            raise InvalidArgument(f"input {name!r} is a scalar; batching needs a batch dimension")
        if rows is None:
            rows = int(arr.shape[0])
        elif arr.shape[0] != rows:
            raise InvalidArgument(
                f"input {name!r} has {arr.shape[0]} rows, other inputs have {rows}"
            )
        sig.append((name, arr.dtype.str, tuple(int(d) for d in arr.shape[1:])))
    assert rows is not None
    return tuple(sorted(sig)), rows


def join(inputs: Sequence[Mapping[str, NDArray[Any]]]) -> Tensors:
    """One batch's inputs: the requests' ``inputs`` (all of one signature) on axis 0, in order."""
    if len(inputs) == 1:
        return dict(inputs[0])
    return {name: np.concatenate([i[name] for i in inputs], axis=0) for name in inputs[0]}


def split(outputs: Tensors, rows: list[int]) -> list[Tensors]:
    """``outputs`` of a batch cut back into one part per request of ``rows`` rows each."""
    total = sum(rows)
    offsets = np.cumsum(rows[:-1])
    parts: list[Tensors] = [{} for _ in rows]
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise RuntimeError(
                f"output {name!r} has shape {list(arr.shape)}; a batch of {total} rows "
                f"needs that leading dimension"
            )
        for part, piece in zip(parts, np.split(arr, offsets, axis=0), strict=True):
            part[name] = piece
    return parts
