"""SDK retries and hedging (pure: attempts are plain functions standing in for gRPC calls)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import grpc
import pytest

from meshserve.client._retry import NO_RETRY, RetryPolicy, call_async, call_sync
from meshserve.common.errors import StatusError


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, hint_ms: int | None = None) -> None:
        self._code, self._hint = code, hint_ms

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"{self._code.name.lower()} on purpose"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self._hint is None else (("retry-after-ms", str(self._hint)),)


async def test_unavailable_is_retried_until_an_answer() -> None:
    calls: list[float] = []

    async def attempt(remaining: float) -> str:
        calls.append(remaining)
        if len(calls) < 3:
            raise _Failed(grpc.StatusCode.UNAVAILABLE)
        return "answer"

    policy = RetryPolicy(initial_backoff_s=0.01)
    assert await call_async(attempt, policy, timeout=5.0) == "answer"
    assert len(calls) == 3 and calls[0] > calls[2]  # each attempt gets only what is left


async def test_a_refusal_is_retried_no_sooner_than_its_hint() -> None:
    started: list[float] = []

    async def attempt(remaining: float) -> str:
        started.append(time.monotonic())
        if len(started) == 1:
            raise _Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, hint_ms=200)
        return "answer"

    assert await call_async(attempt, RetryPolicy(), timeout=5.0) == "answer"
    assert started[1] - started[0] >= 0.2


async def test_no_retry_past_the_deadline_nor_for_a_bad_request() -> None:
    count = 0

    async def refused(remaining: float) -> str:
        nonlocal count
        count += 1
        raise _Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, hint_ms=2000)

    with pytest.raises(StatusError) as info:
        await call_async(refused, RetryPolicy(), timeout=0.5)
    assert count == 1 and info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

    async def invalid(remaining: float) -> str:
        raise _Failed(grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(StatusError, match="invalid_argument on purpose"):
        await call_async(invalid, RetryPolicy(), timeout=5.0)

    async def gone(remaining: float) -> str:
        raise _Failed(grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(StatusError, match=r"after 3 attempts"):
        await call_async(gone, RetryPolicy(max_attempts=3, initial_backoff_s=0.001), 5.0)
    with pytest.raises(StatusError) as once:
        await call_async(gone, NO_RETRY, 5.0)
    assert "attempts" not in once.value.message


async def test_a_slow_attempt_is_hedged_and_the_first_answer_wins() -> None:
    cancelled: list[int] = []
    calls = 0

    async def attempt(remaining: float) -> str:
        nonlocal calls
        calls += 1
        number = calls
        try:
            await asyncio.sleep(5.0 if number == 1 else 0.01)
        except asyncio.CancelledError:
            cancelled.append(number)
            raise
        return f"answer {number}"

    started = time.monotonic()
    result = await call_async(attempt, RetryPolicy(hedge_after_s=0.05), timeout=10.0)
    assert result == "answer 2" and time.monotonic() - started < 1.0
    await asyncio.sleep(0)
    assert cancelled == [1]


def test_the_blocking_client_hedges_too_and_the_first_answer_wins() -> None:
    futures: list[concurrent.futures.Future[str]] = []

    def attempt(remaining: float) -> concurrent.futures.Future[str]:
        future: concurrent.futures.Future[str] = concurrent.futures.Future()
        number = len(futures) + 1
        futures.append(future)
        delay = 5.0 if number == 1 else 0.01  # the first is stuck; the hedge answers
        answer = threading.Timer(delay, lambda: future.done() or future.set_result(f"{number}"))
        answer.daemon = True
        answer.start()
        return future

    started = time.monotonic()
    assert call_sync(attempt, RetryPolicy(hedge_after_s=0.05), timeout=10.0) == "2"
    assert time.monotonic() - started < 1.0
    assert futures[0].cancelled()
