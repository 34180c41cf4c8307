"""Metrics shared by the gateway and the nodes (OpenTelemetry; no-ops until a meter provider is
configured, see :func:`meshserve.common.process.configure_metrics`).

Names: ``rpc.server.duration`` (histogram, ms; exported as ``rpc_server_duration_milliseconds``,
aggregated on the hot path without the SDK: see :class:`_RequestTable`) follows the OpenTelemetry
RPC semantic conventions (``rpc.system``, ``rpc.method``, ``rpc.grpc.status_code``) plus ``model``,
``variant``, ``node`` and ``hop``; ``meshserve.requests`` counts answered queries per model,
variant, node, hop and status.

Labels are what the mesh resolved, never a client's strings: a query whose model the hop does not
know is recorded under ``model="(unknown)"`` (:data:`UNKNOWN`), and the table holds at most
:data:`MAX_ROWS` label sets (later ones share one ``model="(overflow)"`` row per hop and status),
so hostile queries cannot grow it. It records nothing until metrics are configured.

:class:`SharedObservable` is the seam for observable instruments (gauges read at collection
time): the SDK keeps only the first callback registered under a name, so one instrument per name
and process reads every object that registered with it, holding none of them alive.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from meshserve.common.errors import StatusError
from meshserve.protos import inference_pb2

__all__ = [
    "LATENCY_MS_BUCKETS",
    "MAX_ROWS",
    "OVERFLOW",
    "REQUESTS",
    "SECONDS_BUCKETS",
    "UNKNOWN",
    "Labels",
    "Reading",
    "RequestMetrics",
    "SharedObservable",
]

_log = logging.getLogger("meshserve.instruments")

#: Histogram bounds for request-path latencies in milliseconds (the SDK's defaults start at 5 ms:
#: every sub-millisecond query would land in the first bucket).
LATENCY_MS_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    *(25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0),
)
#: Histogram bounds for slow one-off work in seconds (model load, warm-up, a scheduling pass).
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

Attributes = Mapping[str, str | int | float | bool]
Reading = tuple[float, Attributes]
"""One observed value and its attributes."""

Kind = Literal["gauge", "counter", "up_down_counter"]
T = TypeVar("T")

#: The model label of a query for a model this hop does not know (one label, whatever was sent).
UNKNOWN = "(unknown)"
#: The model label of the row that counts queries past :data:`MAX_ROWS` label sets.
OVERFLOW = "(overflow)"
#: At most this many label sets (rows) per request table: a few hundred models x variants x
#: nodes x statuses fit; each row is ~1 KiB, so the table stays under ~10 MiB whatever comes.
MAX_ROWS = 8192

RowKey = tuple[str, str, str, str, int]


class _RequestTable:
    """Request counts and latency histograms aggregated in plain dicts on the hot path (about
    1 us a request, against ~50 us for the two OpenTelemetry SDK instruments with these
    attributes, measured on this machine: 10 % of a node's per-request CPU at full load), exported
    at scrape time by a ``prometheus_client`` collector on the same endpoint as the SDK's metrics
    (:func:`meshserve.common.process.configure_metrics` registers it) under the names the
    OpenTelemetry
    exporter gives the semantic-convention instruments: ``meshserve_requests_total`` and
    ``rpc_server_duration_milliseconds``. Recording happens on the event loop's thread; the
    scrape copies under a lock.

    Bounded: past ``max_rows`` label sets, a new one is counted in its hop's ``(overflow)`` row
    for its status (at most hops x statuses more rows). ``enabled=False``: records nothing (no
    metrics endpoint to read it; :func:`meshserve.common.process.configure_metrics` enables
    the process's table)."""

    def __init__(
        self, bounds: tuple[float, ...], max_rows: int = MAX_ROWS, *, enabled: bool = True
    ) -> None:
        self._bounds = bounds
        self._max_rows = max_rows
        self.enabled = enabled
        self._lock = threading.Lock()
        # (hop, model, variant, node, status) -> [count, sum_ms, bucket counts...]
        self._rows: dict[RowKey, list[float]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, key: RowKey, ms: float) -> None:
        if not self.enabled:
            return
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                if len(self._rows) >= self._max_rows:
                    key = (key[0], OVERFLOW, "", "", key[4])
                    row = self._rows.get(key)
                if row is None:
                    row = self._rows[key] = [0.0] * (2 + len(self._bounds) + 1)
            row[0] += 1
            row[1] += ms
            row[2 + bisect.bisect_left(self._bounds, ms)] += 1

    def snapshot(self) -> list[tuple[RowKey, list[float]]]:
        with self._lock:
            return [(k, list(v)) for k, v in self._rows.items()]

    def collect(self) -> Iterator[Any]:
        """prometheus_client's collector protocol."""
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        labels = ["model", "variant", "node", "hop", "rpc_grpc_status_code"]
        count = CounterMetricFamily(
            "meshserve_requests", "inference queries answered", labels=labels
        )
        duration = HistogramMetricFamily(
            "rpc_server_duration_milliseconds",
            "ModelInfer latency on this hop",
            labels=["rpc_system", "rpc_method", *labels],
        )
        for (hop, model, variant, node, status), row in self.snapshot():
            values = [model, variant, node, hop, str(status)]
            count.add_metric(values, row[0])
            cumulative, buckets = 0.0, []
            for bound, n in zip((*self._bounds, math.inf), row[2:], strict=True):
                cumulative += n
                buckets.append((_bound_text(bound), cumulative))
            duration.add_metric(["grpc", "ModelInfer", *values], buckets, row[1])
        yield count
        yield duration


def _bound_text(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


#: The process's request table (gateway and node hops share it, told apart by ``hop``); off
#: until metrics are configured.
REQUESTS = _RequestTable(LATENCY_MS_BUCKETS, enabled=False)


@dataclass(slots=True)
class Labels:
    """What one query is recorded under, filled in by the hop as it resolves the query: the
    model and variant it found (never the strings the client sent: :data:`UNKNOWN` until
    found) and the node that answered."""

    model: str = UNKNOWN
    variant: str = ""
    node: str = ""


class RequestMetrics:
    """One hop's view of :data:`REQUESTS` (``hop``: "gateway" or "node")."""

    def __init__(self, hop: str, table: _RequestTable | None = None) -> None:
        self._hop = hop
        self._table = REQUESTS if table is None else table

    def record(self, labels: Labels, status: int, seconds: float) -> None:
        key = (self._hop, labels.model, labels.variant, labels.node, status)
        self._table.record(key, seconds * 1000.0)

    async def measure(
        self, call: Awaitable[inference_pb2.ModelInferResponse], labels: Labels
    ) -> inference_pb2.ModelInferResponse:
        """Await ``call`` and record it under ``labels`` (which ``call`` fills in as it
        resolves the query), failed or not."""
        started = time.monotonic()
        try:
            response = await call
        except StatusError as exc:
            code: int = exc.code.value[0]
            self.record(labels, code, time.monotonic() - started)
            raise
        self.record(labels, 0, time.monotonic() - started)
        return response


class SharedObservable:
    """One observable instrument reporting what every watched object reads at collection time.

    Collection runs on the metrics exporter's thread: a ``read`` function must only copy plain
    values (no awaiting, no locks the event loop holds) and must not keep its owner alive (take
    it as the argument, capture nothing). An owner that was garbage-collected is forgotten; a
    ``read`` that raises is logged and skipped, never hiding the other owners' readings.
    """

    def __init__(self, meter: Meter, name: str, kind: Kind, unit: str, description: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._sources: list[Callable[[], Iterable[Reading] | None]] = []
        create = {
            "gauge": meter.create_observable_gauge,
            "counter": meter.create_observable_counter,
            "up_down_counter": meter.create_observable_up_down_counter,
        }[kind]
        create(name, callbacks=[self._collect], unit=unit, description=description)

    def watch(self, owner: T, read: Callable[[T], Iterable[Reading]]) -> None:
        """Report ``read(owner)`` at every collection for as long as ``owner`` lives."""
        ref = weakref.ref(owner)

        def source() -> Iterable[Reading] | None:
            live = ref()
            return None if live is None else read(live)

        with self._lock:
            self._sources.append(source)

    def _collect(self, options: CallbackOptions) -> Iterator[Observation]:
        with self._lock:
            sources = list(self._sources)
        for source in sources:
            try:
                readings = source()
                if readings is None:
                    with self._lock:
                        self._sources.remove(source)
                    continue
                out = [Observation(value, dict(attrs)) for value, attrs in readings]
            except Exception:
                _log.exception("reading %s failed", self.name)
                continue
            yield from out
