"""Adaptive, deadline-aware dynamic batching in front of ONE loaded copy.

Contract:

* :meth:`Batcher.submit` concatenates the rows (axis 0) of concurrent requests that share a
  *signature* (same input names, dtypes and non-batch dimensions) into one call of ``execute``
  of at most :attr:`Batcher.current_max_batch_size` rows; a single request larger than that runs
  alone, unsplit. Signatures are never mixed in one batch. The outputs (which must carry the same
  leading batch dimension) are split back by row counts: every caller receives views of exactly
  its own rows, in order.
* Lazy dispatch: a request that arrives while nothing runs and nothing is queued starts at once, so
  light load adds no latency even with ``max_queue_delay_us > 0``. While
  ``max_concurrent_batches`` batches run, arrivals queue; when a slot frees, the oldest signature
  group leaves with everything compatible that fits (natural batching).
* With ``max_queue_delay_us > 0`` a *backlog* that neither fills the cap nor reaches a preferred
  size may be held for more rows until its oldest request has waited that long, but never past the
  earliest deadline in it minus the expected execution latency (an EWMA per power-of-two batch-size
  bucket). A backlog with a deadline and no latency estimate yet is never held.
* A request whose ``deadline`` (absolute, on ``clock``, default :func:`time.monotonic`) has passed
  when its batch would start fails with :class:`DeadlineExceeded` and is not executed. A cancelled
  caller's request leaves the queue if its batch has not started.
* At most ``max_queue`` requests wait: beyond that :meth:`submit` raises
  :class:`ResourceExhausted` at once. An exception from ``execute`` reaches every caller of that
  batch; the batcher keeps working.
* Adaptive mode (``adaptive`` with ``latency_slo_ms``): the cap starts at ``max_batch_size``,
  halves (min 1) after a batch slower than the SLO and grows by ``max(1, max_batch_size // 16)``
  (never above ``max_batch_size``) after a batch faster than 0.8 x SLO that left compatible
  requests queued.
* :meth:`close` rejects new requests and fails queued ones with :class:`Unavailable`, lets running
  batches finish and awaits every task it started. The dispatcher task only exists while requests
  are queued, so an idle batcher holds no task.
* Tracing (OpenTelemetry; the API's no-op tracer when none is configured): a caller whose span is
  recording gets a ``node queue`` span (submit to the start of its batch); each batch with a
  recording rider gets one ``node batch`` span, a child of its oldest recording rider's span,
  linked to every recording rider's span, and each rider's queue span is linked back to it.
  Callers whose span is not recording cost nothing here.
* An ``observer`` (:class:`BatchObserver`, metrics) hears every request's queue wait and every
  batch's size when the batch starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext

from meshserve.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)

__all__ = [
    "BatchObserver",
    "BatchPolicy",
    "Batcher",
    "BatcherStats",
    "Execute",
    "Tensors",
    "has_batch_axis",
]

_log = logging.getLogger("meshserve.node.batcher")
_tracer = trace.get_tracer("meshserve.node")

Tensors = dict[str, NDArray[Any]]
Execute = Callable[[Tensors], Awaitable[Tensors]]
_Signature = tuple[tuple[str, str, tuple[int, ...]], ...]

_EWMA_ALPHA = 0.3
_GROW_BELOW = 0.8  # adaptive: grow while a batch takes less than this fraction of the SLO


class BatchObserver(Protocol):
    """Hears what a batcher does (metrics). Called on the event loop when a batch starts: must be
    cheap and must not raise."""

    def queued(self, seconds: float) -> None:
        """One request of the starting batch waited ``seconds`` (on the batcher's clock)."""

    def batched(self, rows: int, requests: int) -> None:
        """A batch of ``rows`` rows from ``requests`` requests starts."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32  # rows
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue: int = 1024  # requests
    adaptive: bool = False
    latency_slo_ms: float | None = None
    max_concurrent_batches: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_concurrent_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        bad = [p for p in self.preferred_batch_sizes if not 1 <= p <= self.max_batch_size]
        if bad:
            raise ValueError(
                f"preferred_batch_sizes {bad} outside 1..max_batch_size ({self.max_batch_size})"
            )
        if self.latency_slo_ms is not None and not self.latency_slo_ms > 0:
            raise ValueError(f"latency_slo_ms must be > 0, got {self.latency_slo_ms}")
        if self.adaptive and self.latency_slo_ms is None:
            raise ValueError("adaptive batching needs latency_slo_ms")


@dataclass
class BatcherStats:
    requests: int = 0  # accepted by submit
    batches: int = 0
    rows: int = 0
    rejected_queue_full: int = 0
    expired: int = 0
    batch_size_histogram: dict[int, int] = field(default_factory=dict)  # rows -> batches
    last_batch_latency_s: float = 0.0
    queue_depth: int = 0  # requests waiting
    in_flight: int = 0  # rows executing


@dataclass(eq=False)
class _Request:
    inputs: Mapping[str, NDArray[Any]]
    signature: _Signature
    rows: int
    deadline: float | None
    enqueued: float
    seq: int
    lone: bool  # arrived while nothing ran and nothing was queued
    future: asyncio.Future[Tensors]
    queued: bool = True
    origin: SpanContext | None = None  # the caller's span, when it records (linked by its batch)
    span: trace.Span | None = None  # "node queue": from submit to the start of its batch


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


def _batch_span(batch: list[_Request], rows: int) -> trace.Span | None:
    """The "node batch" span of a starting batch (see the module docstring), which ends the
    riders' queue spans; None when no rider records."""
    origins = [r.origin for r in batch if r.origin is not None]
    if not origins:
        return None
    span = _tracer.start_span(
        "node batch",
        context=trace.set_span_in_context(NonRecordingSpan(origins[0])),
        links=[Link(origin) for origin in origins],
        attributes={"meshserve.batch_size": rows, "meshserve.batch_requests": len(batch)},
    )
    batch_context = span.get_span_context()
    for req in batch:
        if req.span is not None:
            req.span.add_link(batch_context)
            req.span.end()
    return span


def _bucket(rows: int) -> int:
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()


def _signature(inputs: Mapping[str, NDArray[Any]]) -> tuple[_Signature, int]:
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


def _split(outputs: Tensors, rows: list[int]) -> list[Tensors]:
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


class Batcher:
    """Dynamic batcher for one copy; see the module docstring for the contract."""

    def __init__(
        self,
        execute: Execute,
        policy: BatchPolicy,
        *,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
        observer: BatchObserver | None = None,
    ) -> None:
        self._execute = execute
        self._observer = observer
        self.policy = policy
        self.name = name
        self._clock = clock
        self.stats = BatcherStats()
        self._label = f"batcher {name!r}" if name else "batcher"
        self._groups: dict[_Signature, deque[_Request]] = {}
        self._seq = itertools.count()
        self._current_max = policy.max_batch_size
        self._step = max(1, policy.max_batch_size // 16)
        self._running = 0
        self._latency: dict[int, float] = {}  # EWMA seconds per batch-size bucket
        self._latency_all: float | None = None
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def current_max_batch_size(self) -> int:
        return self._current_max

    @property
    def queue_depth(self) -> int:
        return self.stats.queue_depth

    @property
    def in_flight(self) -> int:
        return self.stats.in_flight

    def expected_latency(self, rows: int) -> float | None:
        """EWMA execution seconds of batches of about ``rows`` rows (None before any batch)."""
        return self._latency.get(_bucket(rows), self._latency_all)

    async def submit(
        self, inputs: Mapping[str, NDArray[Any]], *, deadline: float | None = None
    ) -> Tensors:
        """Run ``inputs`` (rows on axis 0) in some batch; return this request's output rows."""
        if self._closed:
            raise Unavailable(f"{self._label} is closed")
        signature, rows = _signature(inputs)
        st = self.stats
        now = self._clock()
        if deadline is not None and deadline <= now:
            st.expired += 1
            raise DeadlineExceeded(f"{self._label}: deadline passed before the request queued")
        if st.queue_depth >= self.policy.max_queue:
            st.rejected_queue_full += 1
            raise ResourceExhausted(
                f"{self._label} queue full ({st.queue_depth} waiting); retry later"
            )
        loop = asyncio.get_running_loop()
        lone = st.queue_depth == 0 and self._running == 0
        req = _Request(
            inputs, signature, rows, deadline, now, next(self._seq), lone, loop.create_future()
        )
        caller = trace.get_current_span()
        if caller.is_recording():
            req.origin = caller.get_span_context()
            req.span = _tracer.start_span("node queue", attributes={"meshserve.rows": rows})
        self._groups.setdefault(signature, deque()).append(req)
        st.queue_depth += 1
        st.requests += 1
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = loop.create_task(self._dispatch(), name=f"{self._label} dispatch")
        self._wakeup.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            self._remove(req)  # no-op once its batch started
            self._wakeup.set()
            raise
        finally:
            if req.span is not None and req.span.is_recording():  # it never reached a batch
                req.span.end()

    async def close(self) -> None:
        """Refuse new requests, fail queued ones with Unavailable, finish running batches."""
        self._closed = True
        self._fail_queued(Unavailable(f"{self._label} is closing"))
        self._wakeup.set()
        tasks = [*self._batches] + ([self._dispatcher] if self._dispatcher is not None else [])
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- queue -------------------------------------------------------------------------------

    def _remove(self, req: _Request) -> None:
        if not req.queued:
            return
        req.queued = False
        group = self._groups[req.signature]
        group.remove(req)
        if not group:
            del self._groups[req.signature]
        self.stats.queue_depth -= 1

    def _fail_queued(self, exc: BaseException) -> None:
        for group in self._groups.values():
            for req in group:
                req.queued = False
                if not req.future.done():
                    req.future.set_exception(exc)
        self._groups.clear()
        self.stats.queue_depth = 0

    # -- dispatch ----------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        try:
            while not self._closed and self._groups:
                self._wakeup.clear()
                wait = self._dispatch_ready()
                if not self._groups:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wakeup.wait()
        except Exception as exc:  # a bug here must not strand the callers
            _log.exception("%s dispatcher failed", self._label)
            self._fail_queued(exc)

    def _dispatch_ready(self) -> float | None:
        """Start every batch that may start now; seconds until a held one may (None: no hold)."""
        while self._running < self.policy.max_concurrent_batches and self._groups:
            now = self._clock()
            earliest: float | None = None
            for sig in sorted(self._groups, key=lambda s: self._groups[s][0].seq):
                batch, hold_until = self._form(sig, now)
                if not batch:
                    continue
                if hold_until <= now:
                    self._start(sig, batch)
                    break
                earliest = hold_until if earliest is None else min(earliest, hold_until)
            else:
                return None if earliest is None else earliest - now
        return None

    def _form(self, sig: _Signature, now: float) -> tuple[list[_Request], float]:
        """The next batch of ``sig`` (expired requests failed) and when it may leave."""
        cap = self._current_max
        batch: list[_Request] = []
        expired: list[_Request] = []
        rows, full = 0, False
        for req in self._groups[sig]:
            if req.deadline is not None and req.deadline <= now:
                expired.append(req)
            elif batch and rows + req.rows > cap:
                full = True
                break
            else:
                batch.append(req)
                rows += req.rows
                if rows >= cap:
                    full = True
                    break
        for req in expired:
            self._remove(req)
            self.stats.expired += 1
            if not req.future.done():  # a cancelled caller may not have removed it yet
                req.future.set_exception(
                    DeadlineExceeded(f"{self._label}: deadline passed while the request was queued")
                )
        delay = self.policy.max_queue_delay_us / 1e6
        if not batch or delay == 0 or full or batch[0].lone:
            return batch, now
        if rows in self.policy.preferred_batch_sizes:
            return batch, now
        hold_until = batch[0].enqueued + delay
        deadlines = [r.deadline for r in batch if r.deadline is not None]
        if deadlines:
            expected = self.expected_latency(cap)
            hold_until = now if expected is None else min(hold_until, min(deadlines) - expected)
        return batch, hold_until

    def _start(self, sig: _Signature, batch: list[_Request]) -> None:
        group = self._groups[sig]
        for req in batch:
            assert group.popleft() is req
            req.queued = False
        backlog = bool(group)
        if not group:
            del self._groups[sig]
        rows = sum(r.rows for r in batch)
        st = self.stats
        st.queue_depth -= len(batch)
        st.in_flight += rows
        st.batches += 1
        st.rows += rows
        st.batch_size_histogram[rows] = st.batch_size_histogram.get(rows, 0) + 1
        self._running += 1
        if self._observer is not None:
            now = self._clock()
            for req in batch:
                self._observer.queued(now - req.enqueued)
            self._observer.batched(rows, len(batch))
        span = _batch_span(batch, rows)
        task = asyncio.get_running_loop().create_task(
            self._run_batch(batch, rows, backlog, span), name=f"{self._label} batch"
        )
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(
        self, batch: list[_Request], total: int, backlog: bool, span: trace.Span | None
    ) -> None:
        if span is not None:  # this task's own context: spans ``execute`` opens nest under it
            otel_context.attach(trace.set_span_in_context(span))
        try:
            if len(batch) == 1:
                inputs = dict(batch[0].inputs)
            else:
                inputs = {
                    name: np.concatenate([r.inputs[name] for r in batch], axis=0)
                    for name in batch[0].inputs
                }
            started = self._clock()
            outputs = await self._execute(inputs)
            self._observe(total, self._clock() - started, backlog)
            parts = [outputs] if len(batch) == 1 else _split(outputs, [r.rows for r in batch])
        except asyncio.CancelledError:
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(Unavailable(f"{self._label}: batch cancelled"))
            raise
        except Exception as exc:
            if span is not None:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR, str(exc))
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(exc)
        else:
            for req, part in zip(batch, parts, strict=True):
                if not req.future.done():
                    req.future.set_result(part)
        finally:
            self._running -= 1
            self.stats.in_flight -= total
            self._wakeup.set()
            if span is not None:
                span.end()

    def _observe(self, rows: int, latency: float, backlog: bool) -> None:
        self.stats.last_batch_latency_s = latency
        bucket = _bucket(rows)
        prev = self._latency.get(bucket)
        self._latency[bucket] = latency if prev is None else prev + _EWMA_ALPHA * (latency - prev)
        prev = self._latency_all
        self._latency_all = latency if prev is None else prev + _EWMA_ALPHA * (latency - prev)
        slo_ms = self.policy.latency_slo_ms
        if not self.policy.adaptive or slo_ms is None:
            return
        if latency > slo_ms / 1000:
            self._current_max = max(1, self._current_max // 2)
        elif latency < _GROW_BELOW * slo_ms / 1000 and backlog:
            self._current_max = min(self.policy.max_batch_size, self._current_max + self._step)
