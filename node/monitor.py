"""Monitoring on the node: drift sketches per copy, the prediction log, and feedback joins.

Contract:

* :class:`CopyMonitor` (one per READY copy) keeps the copy's drift sketch over tumbling windows of
  ``drift_window_rows`` rows. Per query it only keeps references to the profiled input and the
  label output (O(1)); rows are counted into the bins in bulk
  (:class:`meshserve.common.sketches.Binner`) every :data:`_BIN_EVERY` rows and when a window
  closes. A query with no rows is not kept at all (nothing to count; kept, such queries piled
  up until real traffic came). At most :data:`_KEEP_WINDOWS` closed windows are kept;
  :meth:`CopyMonitor.window_after` hands the newest one a link has not sent.
  Only counts ever leave the node. Without a reference the input is not sketched; the output is
  (class counts of a classifier's predictions), so prediction drift works with no profile.
* :class:`PredictionLog` (one per node) appends sampled predictions of models that opt in as JSON
  lines to rotating files under ``directory`` (at most ``max_files`` files of ``max_file_bytes``;
  the oldest file goes first). An in-memory index maps each logged request id to its prediction
  for as long as the record is on disk (rebuilt from the files at start), so feedback that
  arrives hours later still joins. :meth:`PredictionLog.join` joins one outcome at most once per
  request id and counts it per (model, variant): joined, correct (labels), absolute error
  (values). A prediction is logged under the tenant that asked
  (:func:`meshserve.common.tenancy.current_tenant`; "" unknown or no API keys) and request ids
  are per tenant: feedback joins only the predictions of the tenant it names (an admin's feedback
  names one, or joins the predictions logged under none).
* Nothing here raises into the inference path for monitoring reasons: a query whose inputs do not
  fit the profile is simply not sketched (logged at debug level).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from numpy.typing import NDArray

from meshserve.common.sketches import Binner, add_counts, features_of, prediction_of
from meshserve.protos import mesh_pb2

__all__ = ["CopyMonitor", "FeedbackCounts", "PredictionLog"]

_log = logging.getLogger("meshserve.node.monitor")

_DEFAULT_WINDOW_ROWS = 500
_BIN_EVERY = 256  # rows buffered before they are counted into the bins
_KEEP_WINDOWS = 4
_SUMMARY_VALUES = 16  # inputs with at most this many values are logged whole in summaries
_WINDOW_SEQ = itertools.count(1)  # node-wide: a reloaded copy's windows still sort after


def _python(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


class CopyMonitor:
    """Drift sketches for one copy (see the module contract)."""

    def __init__(
        self,
        model: str,
        variant: str,
        config: mesh_pb2.MonitoringConfig,
        reference: mesh_pb2.DriftProfile,
        output_names: list[str],
    ) -> None:
        self.model = model
        self.variant = variant
        self.config = config
        self.window_rows = config.drift_window_rows or _DEFAULT_WINDOW_ROWS
        self.label_output = config.label_output or (output_names[0] if output_names else "")
        self.logging = config.log_predictions
        self.sample_rate = config.log_sample_rate or 1.0
        self._binner = Binner(reference)
        self._sketch_inputs = self._binner.n_features > 0
        self._inputs: list[NDArray[Any]] = []
        self._outputs: list[NDArray[Any]] = []
        self._buffered = 0
        self._features = self._binner.zeros()
        self._output = np.zeros(0, dtype=np.int64)
        self._rows = 0
        self.windows: collections.deque[mesh_pb2.DriftWindow] = collections.deque(
            maxlen=_KEEP_WINDOWS
        )

    def observe(
        self, inputs: Mapping[str, NDArray[Any]], outputs: Mapping[str, NDArray[Any]]
    ) -> None:
        """Account one answered query (cheap: references only; counting is deferred)."""
        if self.config.drift_off:
            return
        out = outputs.get(self.label_output)
        if out is None:
            return
        rows = out.shape[0] if out.ndim else 1
        if rows == 0:
            return  # nothing to sketch: holding it would only pile up references
        if self._sketch_inputs:
            array = inputs.get(self._binner.input)
            if array is None:
                return
            self._inputs.append(array)
        self._outputs.append(out)
        self._buffered += rows
        if self._buffered >= _BIN_EVERY or self._rows + self._buffered >= self.window_rows:
            self._count()

    @property
    def pending(self) -> int:
        """Answered queries held (by reference) until their rows are counted."""
        return len(self._outputs)

    def _count(self) -> None:
        inputs, outputs = self._inputs, self._outputs
        self._inputs, self._outputs, self._buffered = [], [], 0
        if not outputs:
            return
        try:
            if self._sketch_inputs:
                matrix = features_of(_stack(inputs))
                counts = self._binner.count_features(matrix)
                self._features = [
                    add_counts(old, new) for old, new in zip(self._features, counts, strict=True)
                ]
            predictions, classes = prediction_of(_stack(outputs))
            if classes == self._binner.output_classes:  # a value output needs profile edges
                self._output = add_counts(self._output, self._binner.count_output(predictions))
            self._rows += int(predictions.shape[0])
        except (ValueError, TypeError) as exc:  # inputs that do not fit the profile
            _log.debug("%s/%s: rows not sketched: %s", self.model, self.variant, exc)
            return
        if self._rows >= self.window_rows:
            self._close()

    def _close(self) -> None:
        window = mesh_pb2.DriftWindow(seq=next(_WINDOW_SEQ), rows=self._rows)
        for counts in self._features:
            window.features.add(counts=[int(c) for c in counts])
        window.output.counts.extend(int(c) for c in self._output)
        self.windows.append(window)
        self._features = self._binner.zeros()
        self._output = np.zeros(0, dtype=np.int64)
        self._rows = 0

    def window_after(self, seq: int) -> mesh_pb2.DriftWindow | None:
        """The newest closed window with a sequence number above ``seq`` (None: none)."""
        if self.windows and self.windows[-1].seq > seq:
            return self.windows[-1]
        return None

    def sampled(self) -> bool:
        return self.logging and (self.sample_rate >= 1.0 or random.random() < self.sample_rate)


def monitor_answer(
    monitor: CopyMonitor | None,
    log: PredictionLog | None,
    request_id: str,
    inputs: Mapping[str, NDArray[Any]],
    outputs: Mapping[str, NDArray[Any]],
    node_id: str,
    tenant: str,
) -> str:
    """Sketch an answered query for drift, and log it when the model opts in (sampled);
    returns the request id the answer carries (a new one for a logged query without). Shared by
    a node's handler and an embedded member, so both monitor exactly alike."""
    if monitor is None:
        return request_id
    monitor.observe(inputs, outputs)
    if log is not None and monitor.sampled():
        return log.record(request_id, monitor, inputs, outputs, node_id, tenant)
    return request_id


def _stack(arrays: list[NDArray[Any]]) -> NDArray[Any]:
    """The rows of many queries as one array (one concatenation, not one call per query)."""
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate([a if a.ndim else a.reshape(1) for a in arrays], axis=0)


@dataclass
class FeedbackCounts:
    joined: int = 0
    correct: int = 0
    abs_error: float = 0.0
    logged: int = 0


@dataclass
class _Logged:
    model: str
    variant: str
    prediction: Any
    file_no: int
    joined: bool = False
    tenant: str = ""


@dataclass
class PredictionLog:
    """The node's prediction log and feedback joins (see the module contract)."""

    directory: Path
    max_file_bytes: int = 16 << 20
    max_files: int = 8
    counts: dict[tuple[str, str], FeedbackCounts] = field(default_factory=dict)
    # (tenant, request id) -> the logged prediction, oldest first
    _index: collections.OrderedDict[tuple[str, str], _Logged] = field(
        default_factory=collections.OrderedDict
    )
    _file: TextIO | None = None
    _file_no: int = 0
    _file_bytes: int = 0

    def open(self) -> None:
        """Create the directory and index what earlier runs logged (their records still join)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        files = self._files()
        for number, path in files:
            try:
                with path.open(encoding="utf-8") as fh:
                    for line in fh:
                        try:
                            rec = json.loads(line)
                            tenant = str(rec.get("tenant", ""))
                            self._index[(tenant, rec["id"])] = _Logged(
                                rec["model"],
                                rec["variant"],
                                rec.get("prediction"),
                                number,
                                False,
                                tenant,
                            )
                        except (ValueError, KeyError, TypeError):
                            continue  # a torn last line after a crash
            except OSError as exc:
                _log.warning("prediction log %s unreadable: %s", path, exc)
        self._file_no = files[-1][0] if files else 0
        if self._index:
            _log.info(
                "prediction log: %d records indexed from %s", len(self._index), self.directory
            )

    def _files(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.glob("predictions-*.jsonl"):
            try:
                found.append((int(path.stem.split("-")[1]), path))
            except (IndexError, ValueError):
                continue
        return sorted(found)

    def record(
        self,
        request_id: str,
        monitor: CopyMonitor,
        inputs: Mapping[str, NDArray[Any]],
        outputs: Mapping[str, NDArray[Any]],
        node_id: str,
        tenant: str = "",
    ) -> str:
        """Log one answered query of ``tenant``; returns its request id (a new one when it had
        none)."""
        request_id = request_id or uuid.uuid4().hex
        out = outputs.get(monitor.label_output)
        prediction: Any = None
        if out is not None and out.size:
            values, _classes = prediction_of(out)
            prediction = _python(values[0]) if out.dtype.kind != "O" else _python(out.flat[0])
        record = {
            "id": request_id,
            "time": round(time.time(), 3),
            "model": monitor.model,
            "variant": monitor.variant,
            "node": node_id,
            "tenant": tenant,
            "prediction": prediction,
            "inputs": {
                name: _inputs_entry(array, monitor.config.log_inputs)
                for name, array in inputs.items()
            },
            "outputs": {
                name: array.tolist() if array.size <= _SUMMARY_VALUES else _summary(array)
                for name, array in outputs.items()
            },
        }
        self._write(json.dumps(record, default=_python, separators=(",", ":")) + "\n")
        key = (tenant, request_id)
        self._index[key] = _Logged(
            monitor.model, monitor.variant, prediction, self._file_no, False, tenant
        )
        self._index.move_to_end(key)
        self.counts.setdefault((monitor.model, monitor.variant), FeedbackCounts()).logged += 1
        return request_id

    def _write(self, line: str) -> None:
        if self._file is None or self._file_bytes + len(line) > self.max_file_bytes:
            self._rotate()
        assert self._file is not None
        self._file.write(line)  # flushed by flush() (the node, every second) and close()
        self._file_bytes += len(line)

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file_no += 1
        path = self.directory / f"predictions-{self._file_no:08d}.jsonl"
        self._file = path.open("a", encoding="utf-8")
        self._file_bytes = path.stat().st_size
        files = self._files()
        for number, old in files[: max(0, len(files) - self.max_files)]:
            old.unlink(missing_ok=True)
            while self._index:  # records of removed files no longer join
                first = next(iter(self._index.values()))
                if first.file_no > number:
                    break
                self._index.popitem(last=False)

    def flush(self) -> None:
        """Push buffered records to the file (the node calls this every second)."""
        if self._file is not None:
            self._file.flush()

    def join(self, model: str, item: mesh_pb2.FeedbackItem, tenant: str = "") -> bool:
        """Join one outcome to ``tenant``'s logged prediction; False when unknown (another
        tenant's request id is unknown) or already joined."""
        logged = self._index.get((tenant, item.request_id))
        if logged is None or logged.joined or (model and logged.model != model):
            return False
        truth = item.WhichOneof("truth")
        if truth is None:
            return False
        logged.joined = True
        counts = self.counts.setdefault((logged.model, logged.variant), FeedbackCounts())
        counts.joined += 1
        predicted = logged.prediction
        if truth == "value":
            try:
                counts.abs_error += abs(float(predicted) - item.value)
            except (TypeError, ValueError):
                counts.abs_error += abs(item.value)
        elif truth == "label":
            counts.correct += int(_as_int(predicted) == item.label)
        else:
            counts.correct += int(str(predicted) == item.text_label)
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _summary(array: NDArray[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if array.dtype.kind in "iufb" and array.size:
        values = array.astype(np.float64)
        out.update(
            mean=float(np.mean(values)), min=float(np.min(values)), max=float(np.max(values))
        )
    return out


def _inputs_entry(array: NDArray[Any], whole: bool) -> Any:
    if whole:
        return array.tolist()
    return _summary(array)
