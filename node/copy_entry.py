"""One copy a node holds, as a record: its state, measurements and serving parts, and the
status message that reports it.

Contract:

* A :class:`CopyEntry` is created LOADING by :class:`~meshserve.node.copies.CopyManager` for a
  Load command and is mutated only on the event loop, by the manager (state, measurements,
  session, batcher) and the inference handler (in-flight and request counters).
* :meth:`CopyEntry.status` is the snapshot the control plane sees: identity, state and reason
  (with, when FAILED, whether the failure is permanent),
  load and download progress, memory, whether it batches, the monitoring digest; tensor specs
  once a session exists; the latency profile and execution provider only while READY (a
  profile of a copy that is not serving must not steer routing).
* :meth:`CopyEntry.configure_monitoring` applies monitoring settings; a copy with a session gets
  a fresh :class:`~meshserve.node.monitor.CopyMonitor` (windows restart).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from meshserve.common.sketches import monitoring_digest
from meshserve.node.batcher import Batcher
from meshserve.node.metrics import CopyInstruments
from meshserve.node.monitor import CopyMonitor
from meshserve.node.runtime import OnnxCopy, TensorInfo
from meshserve.protos import mesh_pb2

__all__ = ["CopyEntry"]


class LatencyWindow:
    """The latest answers' latencies of one copy (at most :attr:`SIZE`, none older than
    :attr:`AGE_S`), for the p50/p99 its telemetry reports: a bounded deque, one append per
    query; the percentiles are computed only when telemetry is summarised."""

    SIZE = 1024
    AGE_S = 10.0

    __slots__ = ("_samples",)

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=self.SIZE)

    def record(self, seconds: float, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, seconds))

    def percentiles(self, now: float | None = None) -> tuple[float, float]:
        """(p50, p99) in milliseconds of the recent answers; (0, 0) when there are none."""
        since = (time.monotonic() if now is None else now) - self.AGE_S
        recent = sorted(s for t, s in self._samples if t >= since)
        if not recent:
            return 0.0, 0.0
        last = len(recent) - 1
        return recent[last // 2] * 1e3, recent[min(last, round(last * 0.99))] * 1e3


@dataclass(slots=True)
class CopyEntry:
    model: str
    variant: str
    sha256: str
    state: int = mesh_pb2.LOADING
    reason: str = ""
    permanent: bool = False  # FAILED for a reason retrying the same artifact cannot fix
    revision: int = 0  # the placement revision of the Load that started this copy
    copy: OnnxCopy | None = None
    memory_bytes: int = 0
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    serving: mesh_pb2.ServingConfig = field(default_factory=mesh_pb2.ServingConfig)
    batcher: Batcher | None = field(default=None, repr=False)
    in_flight: int = 0
    bytes_fetched: int = 0
    bytes_total: int = 0
    requests: int = 0
    errors: int = 0
    latency: LatencyWindow = field(default_factory=LatencyWindow, repr=False)  # answered ones
    run_seconds: float = 0.0  # median batch-1 run, measured after warm-up
    run_ewma_s: float = 0.0  # live effective service time per query (see InferenceHandler)
    # (batch size, median run seconds) per size the batcher may use, measured after warm-up
    latency_profile: list[tuple[int, float]] = field(default_factory=list)
    execution_provider: str = ""  # the session's first provider
    monitoring: mesh_pb2.MonitoringConfig = field(default_factory=mesh_pb2.MonitoringConfig)
    reference: mesh_pb2.DriftProfile = field(default_factory=mesh_pb2.DriftProfile)
    monitor: CopyMonitor | None = field(default=None, repr=False)
    inline: bool = False  # run on the event loop: cheaper than a thread hand-off
    pinned: bool = False  # holds one pin on its artifact in the store
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    instruments: CopyInstruments = field(kw_only=True, repr=False)  # metrics of this copy

    def status(self) -> mesh_pb2.CopyStatus:
        msg = mesh_pb2.CopyStatus(
            model=self.model,
            variant=self.variant,
            state=self.state,  # type: ignore[arg-type]
            reason=self.reason,
            permanent=self.permanent and self.state == mesh_pb2.FAILED,
            memory_bytes=self.memory_bytes,
            load_seconds=self.load_seconds,
            sha256=self.sha256,
            warmup_seconds=self.warmup_seconds,
            batched=self.batcher is not None,
            bytes_fetched=self.bytes_fetched,
            bytes_total=self.bytes_total,
            monitoring_digest=monitoring_digest(self.monitoring, self.reference),
        )
        if self.copy is not None:
            msg.inputs.extend(_specs(self.copy.inputs))
            msg.outputs.extend(_specs(self.copy.outputs))
        if self.state == mesh_pb2.READY:
            msg.latency_profile.extend(
                mesh_pb2.LatencyPoint(batch_size=size, seconds=seconds)
                for size, seconds in sorted(self.latency_profile)
            )
            msg.execution_provider = self.execution_provider
        return msg

    def configure_monitoring(
        self, config: mesh_pb2.MonitoringConfig, reference: mesh_pb2.DriftProfile
    ) -> None:
        """Apply monitoring settings (at load, and when they change on a loaded copy)."""
        self.monitoring, self.reference = config, reference
        if self.copy is None:
            return
        outputs = [t.name for t in self.copy.outputs]
        self.monitor = CopyMonitor(self.model, self.variant, config, reference, outputs)


def _specs(infos: tuple[TensorInfo, ...]) -> list[mesh_pb2.TensorSpec]:
    return [mesh_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape) for t in infos]
