"""The node's OpenTelemetry instruments (no-ops until a meter provider is configured, see
:func:`meshserve.common.process.configure_metrics`); request counts and latency are
:class:`meshserve.common.instruments.RequestMetrics`.

==============================  ==============  =============================================
name                            kind, unit      attributes
==============================  ==============  =============================================
meshserve.queue.duration        histogram, ms   model, variant: wait in the batcher's queue
meshserve.batch.size            histogram, row  model, variant: rows per executed batch
meshserve.cache.hits / .misses  counter (obs.)  model, variant: response-cache lookups
meshserve.cache.evictions       counter (obs.)  none: entries the response cache evicted (LRU)
meshserve.copy.load.duration    histogram, s    model, variant: fetch + session creation
meshserve.copy.warmup.duration  histogram, s    model, variant: warm-up runs
meshserve.copy.unloads          counter         model, variant, reason (placement, replaced)
meshserve.copy.memory           gauge (obs.)    model, variant: resident bytes per READY copy
meshserve.link.reconnects       counter         replica (address): stream reconnect attempts
meshserve.telemetry.sent        counter (obs.)  replica (address): telemetry bytes written
==============================  ==============  =============================================

On the query path: an integer increment per cache lookup, one histogram ``record`` per batched
query and one per batch, with attribute dicts built once per copy (:class:`CopyInstruments`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Protocol

from opentelemetry import metrics
from opentelemetry.metrics import Meter

from meshserve.common.instruments import (
    LATENCY_MS_BUCKETS,
    SECONDS_BUCKETS,
    Reading,
    SharedObservable,
)

__all__ = ["CopyInstruments", "NodeMetrics", "node_metrics"]

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _SendsTelemetry(Protocol):
    @property
    def telemetry_bytes_sent(self) -> Mapping[str, int]: ...


class NodeMetrics:
    """Every node instrument, created once (see :func:`node_metrics`); tests pass their own
    meter."""

    def __init__(self, meter: Meter) -> None:
        self.queue = meter.create_histogram(
            "meshserve.queue.duration",
            unit="ms",
            description="time a query waited in the batcher's queue",
            explicit_bucket_boundaries_advisory=LATENCY_MS_BUCKETS,
        )
        self.batch = meter.create_histogram(
            "meshserve.batch.size",
            unit="{row}",
            description="rows per executed batch",
            explicit_bucket_boundaries_advisory=_BATCH_BUCKETS,
        )
        self.hits = SharedObservable(
            meter, "meshserve.cache.hits", "counter", "{lookup}", "response-cache hits"
        )
        self.misses = SharedObservable(
            meter, "meshserve.cache.misses", "counter", "{lookup}", "response-cache misses"
        )
        self.load = meter.create_histogram(
            "meshserve.copy.load.duration",
            unit="s",
            description="fetching an artifact and creating its onnxruntime session",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.warmup = meter.create_histogram(
            "meshserve.copy.warmup.duration",
            unit="s",
            description="warm-up runs of a loaded copy",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.unloads = meter.create_counter(
            "meshserve.copy.unloads", unit="{copy}", description="copies unloaded, by reason"
        )
        self._reconnects = meter.create_counter(
            "meshserve.link.reconnects",
            unit="{reconnect}",
            description="stream reconnect attempts to a control-plane replica",
        )
        self.memory = SharedObservable(
            meter, "meshserve.copy.memory", "gauge", "By", "resident memory of a READY copy"
        )
        self.cache_evictions = SharedObservable(
            meter,
            "meshserve.cache.evictions",
            "counter",
            "{entry}",
            "response-cache entries evicted to stay within the byte bound",
        )
        self._telemetry = SharedObservable(
            meter, "meshserve.telemetry.sent", "counter", "By", "telemetry bytes written"
        )

    def copy(self, model: str, variant: str) -> CopyInstruments:
        """The instruments of one copy (its cache counts are reported while it lives)."""
        instruments = CopyInstruments(self, model, variant)
        self.hits.watch(instruments, _hits)
        self.misses.watch(instruments, _misses)
        return instruments

    def reconnected(self, replica: str) -> None:
        """A link to ``replica`` (its address) is about to reconnect."""
        self._reconnects.add(1, {"replica": replica})

    def watch_telemetry(self, agent: _SendsTelemetry) -> None:
        """Report ``agent.telemetry_bytes_sent`` (bytes per replica address) while it lives."""
        self._telemetry.watch(agent, _telemetry_readings)


def _telemetry_readings(agent: _SendsTelemetry) -> Iterable[Reading]:
    return [
        (float(sent), {"replica": address}) for address, sent in agent.telemetry_bytes_sent.items()
    ]


def _hits(copy: CopyInstruments) -> Iterable[Reading]:
    return [(float(copy.hits), copy.attributes)]


def _misses(copy: CopyInstruments) -> Iterable[Reading]:
    return [(float(copy.misses), copy.attributes)]


class CopyInstruments:
    """The node instruments bound to one copy (its attribute dict built once); implements
    :class:`meshserve.node.batcher.BatchObserver`. Cache lookups are plain counts, read at
    collection."""

    __slots__ = ("__weakref__", "_metrics", "attributes", "hits", "misses")

    def __init__(self, node: NodeMetrics, model: str, variant: str) -> None:
        self._metrics = node
        self.attributes: Mapping[str, str] = {"model": model, "variant": variant}
        self.hits = 0
        self.misses = 0

    def queued(self, seconds: float) -> None:
        self._metrics.queue.record(seconds * 1000.0, self.attributes)

    def batched(self, rows: int, requests: int) -> None:
        self._metrics.batch.record(rows, self.attributes)

    def cache(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def loaded(self, load_seconds: float, warmup_seconds: float | None) -> None:
        """A load finished; ``warmup_seconds`` None when the copy skipped warm-up."""
        self._metrics.load.record(load_seconds, self.attributes)
        if warmup_seconds is not None:
            self._metrics.warmup.record(warmup_seconds, self.attributes)

    def unloaded(self, reason: str) -> None:
        self._metrics.unloads.add(1, {**self.attributes, "reason": reason})


@functools.cache
def node_metrics() -> NodeMetrics:
    """The process's node instruments (created on first use)."""
    return NodeMetrics(metrics.get_meter("meshserve.node"))
