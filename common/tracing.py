"""W3C trace context across gRPC metadata and tunnel frames (the hop seam for OpenTelemetry).

Every hop (SDK, gateway, node) extracts the caller's context, opens its own span as a child, and
injects the new context into whatever it sends next: gRPC metadata for direct calls, the
``trace_context`` map of a tunnel frame for tunneled ones.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context

__all__ = [
    "NO_SPAN",
    "context_from_map",
    "context_from_metadata",
    "inject_map",
    "metadata_with_context",
    "sdk_installed",
    "server_span",
    "set_root_ratio",
]

_KEYS = ("traceparent", "tracestate")


def inject_map(carrier: dict[str, str] | None = None, ctx: Context | None = None) -> dict[str, str]:
    """The current (or given) context as a plain ``{traceparent, tracestate}`` map."""
    out: dict[str, str] = {} if carrier is None else carrier
    propagate.inject(out, context=ctx)
    return out


def metadata_with_context(
    metadata: Iterable[tuple[str, str]] | None = None, ctx: Context | None = None
) -> list[tuple[str, str]]:
    """gRPC call metadata plus the trace context headers (lower-case keys, as gRPC requires)."""
    md = [(k, v) for k, v in (metadata or ()) if k not in _KEYS]
    md.extend(inject_map(ctx=ctx).items())
    return md


def context_from_map(carrier: Mapping[str, str]) -> Context:
    return propagate.extract(dict(carrier))


def context_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """Extract a remote parent from invocation metadata; an empty context when absent."""
    carrier = {k: v for k, v in (metadata or ()) if k in _KEYS and isinstance(v, str)}
    if not carrier:
        return otel_context.get_current()
    return propagate.extract(carrier)


#: Fraction of new (root) traces this process samples where queries enter; None (the default
#: with an exporter: every query is traced): every hop opens its spans and the SDK's sampler
#: decides. Set from ``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` by
#: :func:`meshserve.common.process.configure_tracing` (see ``default_sampler`` there).
_root_ratio: float | None = None


def set_root_ratio(ratio: float | None) -> None:
    global _root_ratio
    _root_ratio = ratio


#: A span context manager for a query that gets no span (reusable: it holds no state).
NO_SPAN: AbstractContextManager[trace.Span] = contextlib.nullcontext(trace.INVALID_SPAN)


_UNKNOWN = object()


def sdk_installed() -> bool:
    """Whether a tracer provider (the SDK's) is installed: what the API's proxy tracers check
    themselves, its module global (set once, never replaced). Read directly:
    ``trace.get_tracer_provider()`` costs ~2 us, most of it an environment lookup."""
    provider = getattr(trace, "_TRACER_PROVIDER", _UNKNOWN)
    if provider is _UNKNOWN:  # another API version: ask it
        return type(trace.get_tracer_provider()) is not trace.ProxyTracerProvider
    return provider is not None


def server_span(
    tracer: trace.Tracer, name: str, parent: Context | None, attributes: dict[str, str]
) -> AbstractContextManager[trace.Span]:
    """The SERVER span of one hop. A query that starts a new trace which the root ratio does
    not sample gets no span at all (the API's invalid span): with the SDK installed, even a
    non-recording span costs ~20 us, which at full load is several percent of a node's CPU. A
    query whose caller sent trace context always gets its span (the caller decided)."""
    ratio = _root_ratio
    if ratio is None:
        # No SDK installed (the API's proxy provider): a span would be a non-recording one
        # that only carries the caller's context on. Without a caller's context there is
        # nothing to carry: skip the span (saves 5-10 us a hop here).
        if not trace.get_current_span(parent).get_span_context().is_valid and not sdk_installed():
            return NO_SPAN
    elif (
        not trace.get_current_span(parent).get_span_context().is_valid and random.random() >= ratio
    ):
        return NO_SPAN
    return tracer.start_as_current_span(
        name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
    )
