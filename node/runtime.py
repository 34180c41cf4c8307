"""The onnxruntime seam: one :class:`OnnxCopy` is one loaded session of one variant.

Contract: :meth:`OnnxCopy.load` either returns a copy whose inputs/outputs are known, or raises
:class:`LoadError` with the reason (not ONNX, unsupported op, ...). :meth:`OnnxCopy.run` validates
every input against the model's declared names, datatypes and shapes before onnxruntime sees it
(raising ``InvalidArgument`` that names the input), then runs in the given executor so the event
loop is never blocked.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from meshserve.common.datatypes import BY_ORT_TYPE, numpy_dtype
from meshserve.common.errors import InvalidArgument

__all__ = ["LoadError", "OnnxCopy", "TensorInfo", "available_providers"]


class LoadError(Exception):
    """A model could not be loaded; ``str()`` is the reason reported to the control plane."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 where the dimension is dynamic


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _tensor_infos(args: Sequence[Any]) -> tuple[TensorInfo, ...]:
    infos = []
    for arg in args:
        datatype = BY_ORT_TYPE.get(arg.type)
        if datatype is None:
            raise LoadError(
                f"tensor {arg.name!r} has type {arg.type}, which meshserve cannot serve"
            )
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        infos.append(TensorInfo(arg.name, datatype, shape))
    return tuple(infos)


class OnnxCopy:
    """A loaded onnxruntime session and its tensor metadata. Create with :meth:`load`."""

    def __init__(
        self, session: Any, inputs: tuple[TensorInfo, ...], outputs: tuple[TensorInfo, ...]
    ) -> None:
        self._session = session
        self.inputs = inputs
        self.outputs = outputs
        self._inputs_by_name = {t.name: t for t in inputs}
        self._output_names = [t.name for t in outputs]

    @classmethod
    def load(
        cls,
        path: Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        *,
        intra_op_threads: int = 1,
    ) -> OnnxCopy:
        """Blocking: call from a worker thread."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise LoadError(f"execution provider(s) not available on this node: {missing}")
        try:
            session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            first_line = (
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
            raise LoadError(f"not a loadable ONNX model: {first_line}") from exc
        return cls(
            session, _tensor_infos(session.get_inputs()), _tensor_infos(session.get_outputs())
        )

    def validate(
        self, inputs: Mapping[str, npt.NDArray[Any]], datatypes: Mapping[str, str]
    ) -> None:
        """Raise InvalidArgument naming the first input that does not match the model."""
        for name in inputs:
            if name not in self._inputs_by_name:
                expected = ", ".join(sorted(self._inputs_by_name))
                raise InvalidArgument(f"unknown input {name!r}; the model expects: {expected}")
        for info in self.inputs:
            if info.name not in inputs:
                raise InvalidArgument(
                    f"missing input {info.name!r} ({info.datatype} {list(info.shape)})"
                )
            got_type = datatypes.get(info.name, info.datatype)
            if got_type != info.datatype:
                raise InvalidArgument(
                    f"input {info.name!r} has datatype {got_type}, "
                    f"the model expects {info.datatype}"
                )
            shape = inputs[info.name].shape
            if len(shape) != len(info.shape) or any(
                want not in (-1, got) for want, got in zip(info.shape, shape, strict=True)
            ):
                raise InvalidArgument(
                    f"input {info.name!r} has shape {list(shape)}, the model expects "
                    f"{list(info.shape)} (-1 = any size)"
                )

    @property
    def batch_axis(self) -> bool:
        """Every input and output has a dynamic first dimension: requests can be batched."""
        from meshserve.node.batcher import has_batch_axis

        return has_batch_axis([t.shape for t in self.inputs], [t.shape for t in self.outputs])

    def synthetic_inputs(self, batch: int = 1) -> dict[str, npt.NDArray[Any]]:
        """Zeros shaped like the model's inputs (dynamic dims: ``batch`` first, else 1)."""
        out: dict[str, npt.NDArray[Any]] = {}
        for info in self.inputs:
            shape = [(batch if i == 0 else 1) if d == -1 else d for i, d in enumerate(info.shape)]
            if info.datatype == "BYTES":
                out[info.name] = np.full(shape, b"", dtype=object)
            else:
                out[info.name] = np.zeros(shape, dtype=numpy_dtype(info.datatype))
        return out

    def warmup_blocking(self, batch_sizes: Sequence[int]) -> None:
        """Run synthetic inputs once per batch size (blocking: call from a worker thread).

        onnxruntime allocates and tunes on the first runs of each shape; doing it here means the
        first real query after READY never pays for it.
        """
        sizes = sorted(set(batch_sizes)) if self.batch_axis else [1]
        for size in sizes:
            for _ in range(2):
                self.run_blocking(self.synthetic_inputs(size), self._output_names)

    def latency_profile(
        self, batch_sizes: Sequence[int], runs: int = 15, budget_s: float = 0.5
    ) -> list[tuple[int, float]]:
        """Median wall time of a run on synthetic inputs per batch size (blocking; after warm-up).

        Measures every size in ``batch_sizes`` plus 1 (only 1 for a model without a batch axis),
        at most ``runs`` runs per size, stopping early once that size's runs took more than
        ``budget_s`` in total (at least one run each), so huge models stay quick to load.
        Returns ``(batch_size, seconds)`` pairs sorted by batch size.
        """
        import time

        sizes = sorted({1, *batch_sizes}) if self.batch_axis else [1]
        profile = []
        for size in sizes:
            inputs = self.synthetic_inputs(size)
            samples: list[float] = []
            spent = 0.0
            for _ in range(max(1, runs)):
                started = time.perf_counter()
                self.run_blocking(inputs, self._output_names)
                samples.append(time.perf_counter() - started)
                spent += samples[-1]
                if spent > budget_s:
                    break
            profile.append((size, float(np.median(samples))))
        return profile

    @property
    def execution_provider(self) -> str:
        """The session's first (preferred) execution provider, e.g. ``CPUExecutionProvider``."""
        providers = self._session.get_providers()
        return str(providers[0]) if providers else ""

    def output_names(self, requested: Sequence[str]) -> list[str]:
        if not requested:
            return self._output_names
        for name in requested:
            if name not in self._output_names:
                raise InvalidArgument(
                    f"unknown output {name!r}; the model has: {', '.join(self._output_names)}"
                )
        return list(requested)

    def run_blocking(
        self, inputs: Mapping[str, npt.NDArray[Any]], output_names: Sequence[str]
    ) -> dict[str, npt.NDArray[Any]]:
        feed = {name: _to_ort(arr) for name, arr in inputs.items()}
        results = self._session.run(list(output_names), feed)
        return dict(zip(output_names, results, strict=True))

    @property
    def all_outputs(self) -> list[str]:
        return list(self._output_names)


def _to_ort(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if arr.dtype == object:  # BYTES: onnxruntime wants str for tensor(string)
        strings: npt.NDArray[Any] = np.vectorize(
            lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v),
            otypes=[object],
        )(arr)
        return strings
    return arr


class CpuMeter:
    """This process's CPU use in percent of one core, averaged since the previous reading at
    least ``min_interval_s`` ago (readings in between return the last figure)."""

    def __init__(self, min_interval_s: float = 0.5) -> None:
        self._min = min_interval_s
        self._wall = time.monotonic()
        self._cpu = time.process_time()
        self._percent = 0.0

    def percent(self) -> float:
        wall, cpu = time.monotonic(), time.process_time()
        if wall - self._wall >= self._min:
            self._percent = 100.0 * (cpu - self._cpu) / (wall - self._wall)
            self._wall, self._cpu = wall, cpu
        return self._percent


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
