"""Tests for meshserve.node.batcher: the batching logic with a fake executor, and once with
onnxruntime.

No assertion depends on wall-clock time: a fake clock drives deadlines and measured latency, an
asyncio.Event holds a batch "running", and counters/histograms show what ran together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from meshserve.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from meshserve.devtools.demo_models import make_mlp
from meshserve.node import batcher as batcher_module
from meshserve.node.batcher import Batcher, BatchPolicy, Tensors, has_batch_axis
from meshserve.node.runtime import OnnxCopy

HOUR_US = 3_600_000_000


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeExec:
    """Doubles each input into ``<name>_out``; records batch sizes; may be gated/slow/failing."""

    def __init__(self, clock: FakeClock | None = None, latency: float = 0.0) -> None:
        self.clock, self.latency = clock, latency
        self.sizes: list[int] = []
        self.calls: list[Tensors] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.fail_on_rows: set[int] = set()

    def hold(self) -> None:
        self.gate, self.started = asyncio.Event(), asyncio.Event()

    async def __call__(self, inputs: Tensors) -> Tensors:
        rows = len(next(iter(inputs.values())))
        self.sizes.append(rows)
        self.calls.append(inputs)
        self.started.set()
        await self.gate.wait()
        if self.clock is not None:
            self.clock.t += self.latency
        if rows in self.fail_on_rows:
            raise RuntimeError("boom")
        return {f"{k}_out": v * 2 for k, v in inputs.items()}


def rows_of(value: float, n: int, width: int = 3, dtype: Any = np.float32) -> dict[str, Any]:
    return {"x": np.full((n, width), value, dtype=dtype)}


async def until(pred: Callable[[], bool]) -> None:
    for _ in range(1000):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def spawn(b: Batcher, inputs: dict[str, Any], **kw: Any) -> asyncio.Task[Tensors]:
    return asyncio.create_task(b.submit(inputs, **kw))


async def start_held(b: Batcher, ex: FakeExec) -> asyncio.Task[Tensors]:
    """Submit a one-row request that runs at once and stays running until ``ex.gate`` is set."""
    ex.hold()
    first = spawn(b, rows_of(0, 1))
    await ex.started.wait()
    return first


async def test_arrivals_during_a_batch_run_together_and_get_their_own_rows() -> None:
    ex = FakeExec()
    b = Batcher(ex, BatchPolicy(max_batch_size=32), name="m")
    first = await start_held(b, ex)
    tasks = [spawn(b, rows_of(i, i)) for i in range(1, 6)]
    await until(lambda: b.queue_depth == 5)
    ex.gate.set()
    results = await asyncio.gather(first, *tasks)
    assert ex.sizes == [1, 15]
    for i, res in enumerate(results[1:], start=1):
        assert res["x_out"].shape == (i, 3)
        assert np.all(res["x_out"] == 2 * i)
    st = b.stats
    assert (st.requests, st.batches, st.rows) == (6, 2, 16)
    assert st.batch_size_histogram == {1: 1, 15: 1}
    assert (b.queue_depth, b.in_flight) == (0, 0)
    await b.close()


async def test_lone_request_runs_immediately_despite_long_queue_delay() -> None:
    ex = FakeExec()
    b = Batcher(ex, BatchPolicy(max_queue_delay_us=HOUR_US))
    task = spawn(b, rows_of(1, 1))
    await asyncio.wait_for(ex.started.wait(), timeout=30)  # liveness bound, not a timing check
    assert ex.sizes == [1]
    assert np.all((await task)["x_out"] == 2)
    await b.close()


async def test_backlog_held_until_preferred_size_and_near_deadline_not_held() -> None:
    clock = FakeClock()
    ex = FakeExec(clock, latency=10.0)
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_us=HOUR_US, preferred_batch_sizes=(6,))
    b = Batcher(ex, policy, clock=clock)
    first = await start_held(b, ex)
    held = [spawn(b, rows_of(1, 1))]
    await until(lambda: b.queue_depth == 1)
    ex.gate.set()
    await first
    await settle()
    assert ex.sizes == [1]  # a backlog of 1 row waits for more (queue delay is an hour)
    held.append(spawn(b, rows_of(2, 3)))
    await settle()
    assert ex.sizes == [1]  # 4 rows: still neither preferred nor full
    held.append(spawn(b, rows_of(3, 2)))  # 6 rows = preferred size: leaves at once
    await asyncio.gather(*held)
    assert ex.sizes == [1, 6]
    assert b.expected_latency(6) == pytest.approx(10.0)

    first = await start_held(b, ex)  # a lone request again runs at once
    held = [spawn(b, rows_of(4, 1))]
    await until(lambda: b.queue_depth == 1)
    ex.gate.set()
    await first
    await settle()
    assert ex.sizes == [1, 6, 1]
    # deadline 5 s away, batches take ~10 s: the backlog must not wait any longer
    held.append(spawn(b, rows_of(5, 1), deadline=clock.t + 5))
    results = await asyncio.gather(*held)
    assert ex.sizes == [1, 6, 1, 2]
    assert [float(r["x_out"][0, 0]) for r in results] == [8.0, 10.0]
    await b.close()


async def test_expired_request_fails_and_is_not_executed() -> None:
    clock = FakeClock()
    ex = FakeExec(clock)
    b = Batcher(ex, BatchPolicy(), clock=clock)
    first = await start_held(b, ex)
    late = spawn(b, rows_of(1, 1), deadline=clock.t + 1)
    await until(lambda: b.queue_depth == 1)
    clock.t += 5
    ex.gate.set()
    await first
    with pytest.raises(DeadlineExceeded):
        await late
    with pytest.raises(DeadlineExceeded):
        await b.submit(rows_of(1, 1), deadline=clock.t - 1)
    assert ex.sizes == [1]
    assert b.stats.expired == 2
    await b.close()


async def test_cancelled_caller_leaves_the_queue() -> None:
    ex = FakeExec()
    b = Batcher(ex, BatchPolicy())
    first = await start_held(b, ex)
    gone = spawn(b, rows_of(1, 1))
    await until(lambda: b.queue_depth == 1)
    gone.cancel()
    await until(lambda: b.queue_depth == 0)
    ex.gate.set()
    await first
    await settle()
    assert ex.sizes == [1]
    await b.close()


async def test_full_queue_rejects_at_once() -> None:
    ex = FakeExec()
    b = Batcher(ex, BatchPolicy(max_queue=2), name="m")
    first = await start_held(b, ex)
    queued = [spawn(b, rows_of(i, 1)) for i in (1, 2)]
    await until(lambda: b.queue_depth == 2)
    with pytest.raises(ResourceExhausted, match=r"queue full \(2 waiting\)"):
        await b.submit(rows_of(3, 1))
    assert b.stats.rejected_queue_full == 1
    ex.gate.set()
    await asyncio.gather(first, *queued)
    assert ex.sizes == [1, 2]
    await b.close()


async def test_signatures_are_never_mixed() -> None:
    ex = FakeExec()
    b = Batcher(ex, BatchPolicy())
    first = await start_held(b, ex)
    tasks = [
        spawn(b, rows_of(1, 1, width=3)),
        spawn(b, rows_of(2, 2, width=4)),
        spawn(b, rows_of(3, 1, width=3)),
        spawn(b, rows_of(4, 1, width=3, dtype=np.float64)),
    ]
    await until(lambda: b.queue_depth == 4)
    ex.gate.set()
    results = await asyncio.gather(first, *tasks)
    assert ex.sizes == [1, 2, 2, 1]  # oldest group first: widths 3, then 4, then float64
    for call in ex.calls:
        assert len({(a.dtype, a.shape[1:]) for a in call.values()}) == 1
    assert [r["x_out"].shape for r in results[1:]] == [(1, 3), (2, 4), (1, 3), (1, 3)]
    assert results[4]["x_out"].dtype == np.float64
    with pytest.raises(InvalidArgument):
        await b.submit({"x": np.zeros((2, 3)), "z": np.zeros((1, 3))})
    with pytest.raises(InvalidArgument):
        await b.submit({"x": np.array(1.0, dtype=np.float32)})
    await b.close()


async def test_adaptive_shrinks_over_slo_and_grows_under_it_capped() -> None:
    clock = FakeClock()
    ex = FakeExec(clock, latency=0.5)
    policy = BatchPolicy(max_batch_size=8, adaptive=True, latency_slo_ms=100)
    b = Batcher(ex, policy, clock=clock)
    assert b.current_max_batch_size == 8
    caps = []
    for _ in range(4):
        await b.submit(rows_of(1, 1))
        caps.append(b.current_max_batch_size)
    assert caps == [4, 2, 1, 1]
    ex.latency = 0.01
    first = await start_held(b, ex)
    tasks = [spawn(b, rows_of(i, 1)) for i in range(40)]
    await until(lambda: b.queue_depth == 40)
    ex.gate.set()
    results = await asyncio.gather(first, *tasks)
    assert ex.sizes[4:] == [1, 1, 2, 3, 4, 5, 6, 7, 8, 4]
    assert b.current_max_batch_size == 8
    assert [float(r["x_out"][0, 0]) for r in results[1:]] == [2.0 * i for i in range(40)]
    await b.close()


async def test_executor_error_reaches_the_whole_batch_only() -> None:
    ex = FakeExec()
    ex.fail_on_rows = {5}
    b = Batcher(ex, BatchPolicy())
    first = await start_held(b, ex)
    doomed = [spawn(b, rows_of(1, 2)), spawn(b, rows_of(2, 3))]
    await until(lambda: b.queue_depth == 2)
    ex.gate.set()
    await first
    for task in doomed:
        with pytest.raises(RuntimeError, match="boom"):
            await task
    assert np.all((await b.submit(rows_of(7, 1)))["x_out"] == 14)
    assert ex.sizes == [1, 5, 1]
    await b.close()


async def test_close_fails_queued_finishes_running_and_leaves_no_tasks() -> None:
    ex = FakeExec()
    b = Batcher(ex, BatchPolicy())
    first = await start_held(b, ex)
    queued = [spawn(b, rows_of(i, 1)) for i in (1, 2)]
    await until(lambda: b.queue_depth == 2)
    closer = asyncio.create_task(b.close())
    for task in queued:
        with pytest.raises(Unavailable):
            await task
    with pytest.raises(Unavailable):
        await b.submit(rows_of(3, 1))
    assert not closer.done()  # the running batch is still held
    ex.gate.set()
    await closer
    assert np.all((await first)["x_out"] == 0)
    assert ex.sizes == [1]
    assert asyncio.all_tasks() == {asyncio.current_task()}


def test_has_batch_axis_and_policy_validation() -> None:
    assert has_batch_axis([[-1, 64]], [[-1, 10]])
    assert has_batch_axis([[-1], [-1, 3, 3]], [[-1, 2]])
    assert not has_batch_axis([[1, 64]], [[-1, 10]])  # fixed batch
    assert not has_batch_axis([[-1, 64]], [[10]])  # output without batch axis
    assert not has_batch_axis([[]], [[-1]])  # scalar input
    assert not has_batch_axis([], [[-1]])
    for bad in (
        {"max_batch_size": 0},
        {"max_queue_delay_us": -1},
        {"preferred_batch_sizes": (64,)},
        {"max_queue": 0},
        {"adaptive": True},
        {"latency_slo_ms": 0.0},
        {"max_concurrent_batches": 0},
    ):
        with pytest.raises(ValueError):
            BatchPolicy(**bad)


async def test_real_onnxruntime_batches_match_single_requests(tmp_path: Path) -> None:
    copy = OnnxCopy.load(make_mlp(tmp_path / "m.onnx"))
    gate, sizes = asyncio.Event(), []

    async def execute(inputs: Tensors) -> Tensors:
        sizes.append(len(inputs["x"]))
        await gate.wait()
        return await asyncio.to_thread(copy.run_blocking, inputs, ["y"])

    b = Batcher(execute, BatchPolicy(max_batch_size=64), name="mlp")
    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((i % 5 + 1, 64)).astype(np.float32)} for i in range(17)]
    first = spawn(b, requests[0])
    await until(lambda: sizes == [1])
    tasks = [spawn(b, r) for r in requests[1:]]
    await until(lambda: b.queue_depth == 16)
    gate.set()
    results = await asyncio.gather(first, *tasks)
    for req, res in zip(requests, results, strict=True):
        expected = copy.run_blocking(req, ["y"])["y"]
        assert res["y"].shape == expected.shape
        assert np.allclose(res["y"], expected, rtol=1e-4, atol=1e-5)
    assert len(sizes) < len(requests)
    assert b.stats.batches == len(sizes) == 2
    await b.close()


class Observed:
    """A BatchObserver that remembers what it heard."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.batches: list[tuple[int, int]] = []

    def queued(self, seconds: float) -> None:
        self.waits.append(seconds)

    def batched(self, rows: int, requests: int) -> None:
        self.batches.append((rows, requests))


async def test_the_observer_hears_every_wait_and_every_batch() -> None:
    clock = FakeClock()
    observed = Observed()
    ex = FakeExec()
    b = Batcher(ex, BatchPolicy(), clock=clock, observer=observed)
    first = await start_held(b, ex)
    clock.t += 2.0
    tasks = [spawn(b, rows_of(1, 2)), spawn(b, rows_of(2, 3))]
    await until(lambda: b.queue_depth == 2)
    clock.t += 1.0
    ex.gate.set()
    await asyncio.gather(first, *tasks)
    assert observed.batches == [(1, 1), (5, 2)]
    assert observed.waits == [0.0, 1.0, 1.0]
    await b.close()


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> tuple[Tracer, InMemorySpanExporter]:
    """The batcher's tracer, recording into memory (the global provider is left alone)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(batcher_module, "_tracer", tracer)
    return tracer, exporter


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


async def test_a_batch_span_links_its_riders_and_their_queue_spans_link_back(
    traced: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = traced
    ex = FakeExec()
    b = Batcher(ex, BatchPolicy())
    first = await start_held(b, ex)  # an untraced caller: no spans, no links

    async def caller(i: int) -> Tensors:
        with tracer.start_as_current_span(f"caller {i}"):
            return await b.submit(rows_of(i, 1))

    tasks = [asyncio.create_task(caller(i)) for i in range(3)]
    await until(lambda: b.queue_depth == 3)
    ex.gate.set()
    await asyncio.gather(first, *tasks)
    spans = exporter.get_finished_spans()
    callers = [next(s for s in spans if s.name == f"caller {i}") for i in range(3)]
    (batch,) = [s for s in spans if s.name == "node batch"]
    queues = [s for s in spans if s.name == "node queue"]
    assert batch.parent is not None and batch.parent.span_id == span_id(callers[0])
    assert [link.context.span_id for link in batch.links] == [span_id(c) for c in callers]
    assert batch.attributes == {"meshserve.batch_size": 3, "meshserve.batch_requests": 3}
    assert sorted(q.parent.span_id for q in queues if q.parent) == sorted(map(span_id, callers))
    for queue in queues:
        assert [link.context.span_id for link in queue.links] == [span_id(batch)]
        assert queue.end_time is not None and batch.start_time is not None
        assert queue.end_time <= batch.start_time + 1_000_000, "the wait ends as the batch starts"
    await b.close()


async def test_a_request_that_never_runs_still_ends_its_queue_span(
    traced: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = traced
    clock = FakeClock()
    ex = FakeExec(clock)
    b = Batcher(ex, BatchPolicy(), clock=clock)
    first = await start_held(b, ex)

    async def caller() -> Tensors:
        with tracer.start_as_current_span("caller"):
            return await b.submit(rows_of(1, 1), deadline=clock.t + 1.0)

    late = asyncio.create_task(caller())
    await until(lambda: b.queue_depth == 1)
    clock.t += 5.0
    ex.gate.set()
    await first
    with pytest.raises(DeadlineExceeded):
        await late
    (queue,) = [s for s in exporter.get_finished_spans() if s.name == "node queue"]
    assert not queue.links
    assert not [s for s in exporter.get_finished_spans() if s.name == "node batch"]
    await b.close()
