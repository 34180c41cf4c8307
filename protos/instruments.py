"""Metrics shared by the gateway and the nodes (OpenTelemetry; no-ops until a meter provider is
configured, see :func:`protos.process.configure_metrics`).

Names: ``rpc.server.duration`` (histogram, ms) follows the OpenTelemetry RPC semantic
conventions (``rpc.system``, ``rpc.method``, ``rpc.grpc.status_code``) plus ``model``,
``variant``, ``node`` and ``hop``; ``meshserve.requests`` counts answered queries per model,
variant, node, hop and status.

:class:`SharedObservable` is the seam for observable instruments (gauges read at collection
time): the SDK keeps only the first callback registered under a name, so one instrument per name
and process reads every object that registered with it, holding none of them alive.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Literal, TypeVar

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from protos import inference_pb2
from protos.status import StatusError

__all__ = [
    "LATENCY_MS_BUCKETS",
    "SECONDS_BUCKETS",
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


class RequestMetrics:
    def __init__(self, meter_name: str, hop: str) -> None:
        meter = metrics.get_meter(meter_name)
        self._hop = hop
        self._count = meter.create_counter(
            "meshserve.requests", unit="{request}", description="inference queries answered"
        )
        self._duration = meter.create_histogram(
            "rpc.server.duration",
            unit="ms",
            description="ModelInfer latency on this hop",
            explicit_bucket_boundaries_advisory=LATENCY_MS_BUCKETS,
        )

    def record(self, model: str, variant: str, node: str, status: int, seconds: float) -> None:
        self._count.add(
            1,
            {
                "model": model,
                "variant": variant,
                "node": node,
                "hop": self._hop,
                "rpc.grpc.status_code": status,
            },
        )
        self._duration.record(
            seconds * 1000.0,
            {
                "rpc.system": "grpc",
                "rpc.method": "ModelInfer",
                "rpc.grpc.status_code": status,
                "model": model,
                "variant": variant,
                "node": node,
                "hop": self._hop,
            },
        )

    async def measure(
        self,
        call: Awaitable[inference_pb2.ModelInferResponse],
        request: inference_pb2.ModelInferRequest,
        node: str = "",
    ) -> inference_pb2.ModelInferResponse:
        """Await ``call`` (the answer to ``request``) and record it, failed or not. ``node``:
        this hop's node id; empty = the node the answer names (``meshserve_node``)."""
        started = time.monotonic()
        try:
            response = await call
        except StatusError as exc:
            elapsed = time.monotonic() - started
            code: int = exc.code.value[0]
            self.record(request.model_name, request.model_version, node, code, elapsed)
            raise
        named = response.parameters.get("meshserve_node")
        answered_by = node or (named.string_param if named is not None else "")
        elapsed = time.monotonic() - started
        self.record(request.model_name, response.model_version, answered_by, 0, elapsed)
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
