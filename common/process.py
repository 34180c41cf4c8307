"""Process bootstrap shared by the three deployables: event loop, logging, tracing.

Called from each ``main()`` only — importing this module has no side effects.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "configure_logging",
    "configure_metrics",
    "configure_tracing",
    "default_sampler",
    "exit_deadline",
    "install_task_dump",
    "listen_address",
    "metrics_address",
    "otlp_span_exporter",
    "run",
    "service_resource",
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


def exit_deadline(seconds: float, what: str) -> threading.Timer:
    """Arm the last resort of a shutdown: if the process is still running ``seconds`` from now,
    log which asyncio work was left and end it with ``os._exit(1)``.

    Called once a stop signal arrived, beside (never instead of) the orderly sequence (signal →
    cancel → drain → close): that sequence bounds every step itself; this catches what no step
    owns -- a task that swallows its cancellation, a worker thread stuck in a system call that
    ``asyncio.run`` would join forever. A daemon thread: it never keeps the process alive, and
    a normal exit before the deadline cancels nothing and costs nothing.
    """

    def fire() -> None:
        logging.getLogger("meshserve").error(
            "%s: shutdown still running %.1f s after the stop signal (its grace); exiting now "
            "(threads left: %s)",
            what,
            seconds,
            ", ".join(sorted(t.name for t in threading.enumerate())),
        )
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(max(0.0, seconds), fire)
    timer.daemon = True
    timer.name = "exit-deadline"
    timer.start()
    return timer


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def configure_tracing(service_name: str) -> None:
    """Install an SDK tracer provider for this process, if spans have somewhere to go.

    Spans are exported with OTLP (see :func:`otlp_span_exporter`) and/or printed
    (``MESHSERVE_TRACE_CONSOLE=1``), always through a ``BatchSpanProcessor``: a bounded queue
    and a background thread, so exporting never blocks the hot path (``OTEL_BSP_*`` tune it).
    The rest of the standard configuration applies as the SDK reads it: sampling
    (``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``; unset: every query, see
    :func:`default_sampler`), the
    resource (``OTEL_SERVICE_NAME`` overrides ``service_name``; ``OTEL_RESOURCE_ATTRIBUTES``),
    propagation (``OTEL_PROPAGATORS``, default W3C trace context and baggage) and
    ``OTEL_SDK_DISABLED=true``. With no exporter no provider is installed: recording a span
    nobody reads costs ~50 us per hop, while the W3C trace context a caller sends still
    propagates through every hop unchanged (the API's non-recording spans carry it).
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return
    processors: list[SpanProcessor] = []
    exporter = otlp_span_exporter()
    if exporter is not None:
        processors.append(BatchSpanProcessor(exporter))
    if os.environ.get("MESHSERVE_TRACE_CONSOLE") == "1":
        processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
    if not processors:
        return
    from meshserve.common.tracing import set_root_ratio

    sampler, ratio = default_sampler()
    set_root_ratio(ratio)
    provider = TracerProvider(resource=service_resource(service_name), sampler=sampler)
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)


def otlp_span_exporter() -> SpanExporter | None:
    """The OTLP span exporter the standard variables ask for, or None (the default).

    On when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set,
    unless ``OTEL_TRACES_EXPORTER`` names other exporters only (e.g. ``none``). The protocol is
    ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` or ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc`` (the
    default) or ``http/protobuf``; the exporter itself reads the endpoint, headers, timeout,
    compression and certificates. The exporter package (``opentelemetry-exporter-otlp``) is
    optional: without it a warning is logged and nothing is exported.
    """
    env = os.environ
    if not (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        return None
    wanted = {name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    if "otlp" not in wanted:
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or ""
    ).strip()
    module = "http" if protocol.startswith("http") else "grpc"
    try:
        exporters = importlib.import_module(
            f"opentelemetry.exporter.otlp.proto.{module}.trace_exporter"
        )
    except ImportError:
        logging.getLogger("meshserve").warning(
            "an OTLP endpoint is set but opentelemetry-exporter-otlp-proto-%s is not installed; "
            "spans are not exported",
            module,
        )
        return None
    exporter: SpanExporter = exporters.OTLPSpanExporter()
    return exporter


def service_resource(service_name: str) -> Resource:
    """This process's OpenTelemetry resource: ``OTEL_RESOURCE_ATTRIBUTES`` and
    ``OTEL_SERVICE_NAME`` as the SDK reads them, ``service_name`` when they name no service."""
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service_name}))
    return resource


def default_sampler() -> tuple[Any, float | None]:
    """The sampler of a process that exports spans, and the root ratio applied where queries
    enter (:func:`meshserve.common.tracing.set_root_ratio`; None: every hop opens its spans).

    * ``OTEL_TRACES_SAMPLER`` unset: ``parentbased_always_on``, every query is traced. An
      exporter was asked for, so its spans are wanted (a 1 % default showed nothing for the
      first ~100 queries of a quick start).
    * ``parentbased_traceidratio`` (ratio ``OTEL_TRACES_SAMPLER_ARG``, default 1.0): the same
      choice, made where a query enters without trace context and before any span exists:
      an unsampled query costs no span at all (a non-recording one costs ~20 us a hop, several
      percent of a node's CPU at full load); a caller's decision is always followed. Loads and
      scheduling passes (rare root spans) are always kept.
    * any other value: (None, None), the SDK reads the variables itself.
    """
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    name = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return ParentBased(ALWAYS_ON), None
    if name == "parentbased_traceidratio":
        try:
            ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            ratio = 1.0  # what the SDK does with a bad ratio
        return ParentBased(ALWAYS_ON), min(1.0, max(0.0, ratio))
    return None, None


def metrics_address(listen: str) -> tuple[str, int]:
    """The (host, port) a ``--metrics-listen`` value names: ``HOST:PORT`` (``[::1]:PORT`` for
    IPv6); ``:PORT`` or ``PORT`` alone is loopback (127.0.0.1): only an explicit host such as
    ``0.0.0.0`` exposes the metrics beyond this machine. ValueError names what is wrong."""
    return listen_address(listen, "--metrics-listen")


def listen_address(listen: str, flag: str) -> tuple[str, int]:
    """The (host, port) a side listener's ``flag`` value names (``--metrics-listen``,
    ``--http-listen``), as :func:`metrics_address` reads it; ValueError names ``flag``."""
    host, sep, port_text = listen.strip().rpartition(":")
    if not sep:
        host, port_text = "", listen.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{flag} {listen!r}: want HOST:PORT or :PORT (port 0-65535)")
    return host or "127.0.0.1", int(port_text)


def configure_metrics(service_name: str, listen: str) -> None:
    """Serve this process's OpenTelemetry metrics for Prometheus on ``listen`` (see
    :func:`metrics_address`; empty: no endpoint, the instruments stay no-ops and the request
    table records nothing). The scrape runs in prometheus_client's own thread: collecting
    never touches the event loop or the hot path."""
    if not listen:
        return
    host, port = metrics_address(listen)
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    start_http_server(port, addr=host)
    provider = MeterProvider(
        resource=service_resource(service_name), metric_readers=[PrometheusMetricReader()]
    )
    metrics.set_meter_provider(provider)
    from prometheus_client import REGISTRY

    from meshserve.common.instruments import REQUESTS

    REGISTRY.register(REQUESTS)  # hot-path request metrics, aggregated without the SDK
    REQUESTS.enabled = True
    shown = f"[{host}]" if ":" in host else host
    logging.getLogger("meshserve").info(
        "metrics for Prometheus on http://%s:%d/metrics", shown, port
    )


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


def add_listen_options(parser: Any) -> None:
    """``--metrics-listen`` and ``--http-listen`` (parsed by :func:`listen_address`), the same on
    every process that serves them."""
    parser.add_argument(
        "--metrics-listen",
        default="",
        help="HOST:PORT serving Prometheus metrics at /metrics; :PORT is 127.0.0.1 only, "
        "0.0.0.0:PORT every interface (default: off)",
    )
    parser.add_argument(
        "--http-listen",
        default="",
        help="HOST:PORT serving the Open Inference Protocol over HTTP/REST (/v2/...); :PORT is "
        "127.0.0.1 only (default: off; docs/frontdoor.md)",
    )
