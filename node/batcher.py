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
* Adaptive mode (``adaptive`` with ``latency_slo_ms``): the cap follows the latency of finished
  batches (:class:`~meshserve.node.batch_timing.BatchTiming`). Signatures, joining and splitting
  rows are :mod:`meshserve.node.batch_rows`.
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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from numpy.typing import NDArray
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext

from meshserve.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from meshserve.node.batch_rows import Signature, Tensors, has_batch_axis, join, signature, split
from meshserve.node.batch_timing import BatchPolicy, BatchTiming

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

Execute = Callable[[Tensors], Awaitable[Tensors]]


class BatchObserver(Protocol):
    """Hears what a batcher does (metrics). Called on the event loop when a batch starts: must be
    cheap and must not raise."""

    def queued(self, seconds: float) -> None:
        """One request of the starting batch waited ``seconds`` (on the batcher's clock)."""

    def batched(self, rows: int, requests: int) -> None:
        """A batch of ``rows`` rows from ``requests`` requests starts."""


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
    signature: Signature
    rows: int
    deadline: float | None
    enqueued: float
    seq: int
    lone: bool  # arrived while nothing ran and nothing was queued
    future: asyncio.Future[Tensors]
    queued: bool = True
    origin: SpanContext | None = None  # the caller's span, when it records (linked by its batch)
    span: trace.Span | None = None  # "node queue": from submit to the start of its batch


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
        self._groups: dict[Signature, deque[_Request]] = {}
        self._seq = itertools.count()
        self._timing = BatchTiming(policy)
        self._running = 0
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def current_max_batch_size(self) -> int:
        return self._timing.cap

    @property
    def queue_depth(self) -> int:
        return self.stats.queue_depth

    @property
    def in_flight(self) -> int:
        return self.stats.in_flight

    def expected_latency(self, rows: int) -> float | None:
        """EWMA execution seconds of batches of about ``rows`` rows (None before any batch)."""
        return self._timing.expected(rows)

    async def submit(
        self, inputs: Mapping[str, NDArray[Any]], *, deadline: float | None = None
    ) -> Tensors:
        """Run ``inputs`` (rows on axis 0) in some batch; return this request's output rows."""
        if self._closed:
            raise Unavailable(f"{self._label} is closed")
        sig, rows = signature(inputs)
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
            inputs, sig, rows, deadline, now, next(self._seq), lone, loop.create_future()
        )
        caller = trace.get_current_span()
        if caller.is_recording():
            req.origin = caller.get_span_context()
            req.span = _tracer.start_span("node queue", attributes={"meshserve.rows": rows})
        self._groups.setdefault(sig, deque()).append(req)
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

    def _form(self, sig: Signature, now: float) -> tuple[list[_Request], float]:
        """The next batch of ``sig`` (expired requests failed) and when it may leave."""
        cap = self._timing.cap
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

    def _start(self, sig: Signature, batch: list[_Request]) -> None:
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
            inputs = join([r.inputs for r in batch])
            started = self._clock()
            outputs = await self._execute(inputs)
            latency = self._clock() - started
            self.stats.last_batch_latency_s = latency
            self._timing.observe(total, latency, backlog)
            parts = [outputs] if len(batch) == 1 else split(outputs, [r.rows for r in batch])
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
