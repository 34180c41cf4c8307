"""Process bootstrap shared by the three deployables: event loop, logging, tracing.

Called from each ``main()`` only — importing this module has no side effects.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = [
    "configure_logging",
    "configure_metrics",
    "configure_tracing",
    "install_task_dump",
    "run",
]

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], *, use_uvloop: bool | None = None) -> T:
    """Run ``coro`` on uvloop when available (``MESHSERVE_UVLOOP=0`` turns it off)."""
    if use_uvloop is None:
        use_uvloop = os.environ.get("MESHSERVE_UVLOOP", "1") != "0"
    if use_uvloop:
        try:
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(coro)
        except ImportError:
            pass
    return asyncio.run(coro)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def configure_tracing(service_name: str) -> None:
    """Install an SDK tracer provider for this process, if spans have somewhere to go.

    Spans are exported with OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the exporter
    package is installed (batched, off the hot path); ``MESHSERVE_TRACE_CONSOLE=1`` prints them.
    Sampling follows the standard ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` variables
    (default: parent-based, always on). With no exporter no provider is installed: recording a
    span nobody reads costs ~50 us per hop, while the W3C trace context a caller sends still
    propagates through every hop unchanged (the API's non-recording spans carry it).
    """
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    processors: list[SpanProcessor] = []
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )

            processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        except ImportError:
            logging.getLogger("meshserve").warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp is not "
                "installed; spans are not exported"
            )
    if os.environ.get("MESHSERVE_TRACE_CONSOLE") == "1":
        processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
    if not processors:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)


def configure_metrics(service_name: str, listen: str) -> None:
    """Serve this process's OpenTelemetry metrics for Prometheus on ``listen`` (host:port; empty:
    no endpoint, the instruments stay no-ops). The scrape runs in prometheus_client's own
    thread: collecting never touches the event loop or the hot path."""
    if not listen:
        return
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import start_http_server

    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0")
    provider = MeterProvider(
        resource=Resource.create({"service.name": service_name}),
        metric_readers=[PrometheusMetricReader()],
    )
    metrics.set_meter_provider(provider)
    logging.getLogger("meshserve").info("metrics for Prometheus on http://%s/metrics", listen)


def install_task_dump(loop: asyncio.AbstractEventLoop) -> None:
    """On SIGUSR1, log the stack of every asyncio task (like a goroutine dump)."""
    import io
    import signal

    def dump() -> None:
        out = io.StringIO()
        for task in asyncio.all_tasks(loop):
            out.write(f"{task!r}\n")
            for frame in task.get_stack(limit=12):
                code = frame.f_code
                out.write(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}\n")
        logging.getLogger("meshserve.debug").warning("asyncio task dump:\n%s", out.getvalue())

    loop.add_signal_handler(signal.SIGUSR1, dump)
