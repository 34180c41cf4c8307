"""Retries and hedging of SDK calls, inside the caller's deadline.

Contract:
- :class:`RetryPolicy` is pure: which statuses are retriable and how long to wait before the
  next attempt (full jitter on an exponential backoff, never less than the server's hint).
- :func:`translate` reads the server's hint from the trailing metadata: gRPC's own
  ``grpc-retry-pushback-ms`` (:data:`~meshserve.common.errors.PUSHBACK_KEY`, gRFC A6) first,
  else our older ``retry-after-ms``; a negative or malformed pushback means "do not retry"
  (as A6 says): the hint is then infinite and no attempt follows.
- :func:`service_config` is what gRPC retries by itself: the idempotent OIP reads
  (``ServerLive``/``ServerReady``/``ServerMetadata``/``ModelReady``/``ModelMetadata``) on
  UNAVAILABLE, with the policy's attempts (at most 5, gRPC's cap) and backoff; gRPC honours the
  server's pushback there too. The SDK sets it on its gateway channel.
- :func:`call_sync` / :func:`call_async` run ``attempt(timeout_s)`` (a gRPC call, or the SDK's
  routed attempt, which raises :class:`StatusError`) until one answers, a
  non-retriable status comes back, the attempts are used up, or the next attempt could not start
  before the caller's deadline: then the last error is raised (a :class:`StatusError`). Every
  attempt gets only the time left of the one deadline.
- Hedging (opt-in, ``hedge_after_s``): when an attempt has not answered after that long, a
  second one is sent (through a gateway, the second usually lands on another copy: the first
  still counts as in flight on its copy); the first answer wins and the other is cancelled.
  Only idempotent calls (inference) are retried or hedged.

Why inference keeps this loop rather than gRPC's retryPolicy / hedgingPolicy: one policy per
method can do either retries or hedging, not both; its attempts live on one channel, while the
SDK's routed path sends each attempt to a node (or gateway) it picks again, and a hedged attempt
must land on another copy; the caller's one deadline must bound the waits the server asks for;
RESOURCE_EXHAUSTED is retried only when it carries a hint (a size limit fails the same way every
time), which a retryPolicy cannot tell apart; and gRPC caps attempts at 5 and hides the failed
ones from the caller (the "after N attempts" in the error).
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from meshserve.common.errors import PUSHBACK_KEY, RETRY_AFTER_KEY, StatusError, from_code

__all__ = [
    "NO_RETRY",
    "RetryPolicy",
    "call_async",
    "call_sync",
    "retry_hint",
    "service_config",
    "translate",
]

T = TypeVar("T")

#: Retried always; RESOURCE_EXHAUSTED only with a retry-after hint (a full queue, not a size
#: limit: an oversized message fails the same way every time).
_RETRIABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` counts the first; ``hedge_after_s``: send one hedged attempt when the
    first has not answered after this long (None: never)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    retriable: frozenset[grpc.StatusCode] = _RETRIABLE
    hedge_after_s: float | None = None
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.hedge_after_s is not None and self.hedge_after_s <= 0:
            raise ValueError("hedge_after_s must be > 0 (or None)")

    def retriable_error(self, error: StatusError) -> bool:
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return _hint(error) is not None
        return error.code in self.retriable

    def delay(self, attempt: int, hint_s: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * (2 ** (attempt - 1)))
        wait = self.rng.uniform(0.0, cap)
        if hint_s is not None:  # the server said when: spread the returns a little past it
            wait = max(wait, hint_s * self.rng.uniform(1.0, 1.5))
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)

#: The OIP calls gRPC retries by itself (:func:`service_config`): reads, safe to repeat.
IDEMPOTENT_METHODS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata")
_OIP_SERVICE = "inference.GRPCInferenceService"
_GRPC_MAX_ATTEMPTS = 5  # gRPC clamps a retryPolicy's maxAttempts to this


def service_config(policy: RetryPolicy, *, balanced: bool = False) -> str:
    """The channel's ``grpc.service_config`` (JSON): gRPC's own retries of
    :data:`IDEMPOTENT_METHODS` on UNAVAILABLE with ``policy``'s attempts and backoff, and, when
    the channel is ``balanced`` over several replicas, client-side health checking of the OIP
    service (gRFC A17: a replica that turns NOT_SERVING -- stopping, draining -- gets no new
    calls; one without the health service counts as healthy); "" when neither applies."""
    config: dict[str, Any] = {}
    if balanced:
        config["healthCheckConfig"] = {"serviceName": _OIP_SERVICE}
    attempts = min(_GRPC_MAX_ATTEMPTS, policy.max_attempts)
    if attempts < 2:
        return json.dumps(config) if config else ""
    names = [{"service": _OIP_SERVICE, "method": method} for method in IDEMPOTENT_METHODS]
    retry = {
        "maxAttempts": attempts,
        "initialBackoff": f"{max(0.001, policy.initial_backoff_s):.3f}s",
        "maxBackoff": f"{max(0.001, policy.max_backoff_s, policy.initial_backoff_s):.3f}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    config["methodConfig"] = [{"name": names, "retryPolicy": retry}]
    return json.dumps(config)


def retry_hint(metadata: Iterable[Any]) -> float | None:
    """Seconds the server asks the client to wait, from trailing ``metadata``: the standard
    ``grpc-retry-pushback-ms`` if present (negative or malformed: ``math.inf``, no retry),
    else ``retry-after-ms`` (malformed: ignored); None when neither is there."""
    pushback: str | None = None
    ours: str | None = None
    for item in metadata:
        key, value = (item[0], item[1]) if isinstance(item, tuple) else ("", "")
        if key == PUSHBACK_KEY:
            pushback = value if isinstance(value, str) else ""
        elif key == RETRY_AFTER_KEY:
            ours = value if isinstance(value, str) else ""
    if pushback is not None:
        try:
            ms = int(pushback)
        except ValueError:
            return math.inf
        return math.inf if ms < 0 else ms / 1000.0
    if ours is not None:
        try:
            return max(0, int(ours)) / 1000.0
        except ValueError:
            return None
    return None


def translate(exc: grpc.RpcError | StatusError) -> StatusError:
    """The :class:`StatusError` of a failed gRPC call, with its retry-after hint if any (a
    :class:`StatusError` already, as the routed path raises: itself)."""
    if isinstance(exc, StatusError):
        return exc
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    error = from_code(code.value[0], details or code.name)
    hint = None
    if hasattr(exc, "trailing_metadata"):
        hint = retry_hint(exc.trailing_metadata() or ())
    if hint is not None:
        error.retry_after_s = hint  # type: ignore[attr-defined]
    return error


def _hint(error: StatusError) -> float | None:
    value = getattr(error, "retry_after_s", None)
    return float(value) if value is not None else None


def _out_of_time(error: StatusError, attempts: int) -> StatusError:
    if attempts > 1:
        error.message = f"{error.message} (after {attempts} attempts)"
        error.args = (error.message,)
    return error


def _after_failure(
    policy: RetryPolicy, exc: grpc.RpcError | StatusError, number: int, deadline: float
) -> float:
    """Seconds to wait after failed attempt ``number``; raises its error when no retry may
    follow (not retriable, attempts used up, or the wait would reach the deadline)."""
    error = translate(exc)
    if not policy.retriable_error(error) or number == policy.max_attempts:
        raise _out_of_time(error, number) from None
    wait = policy.delay(number, _hint(error))
    if time.monotonic() + wait >= deadline:
        raise _out_of_time(error, number) from None
    return wait


def call_sync(attempt: Callable[[float], Any], policy: RetryPolicy, timeout: float) -> Any:
    """Blocking: ``attempt(timeout_s)`` returns a started gRPC future (``stub.X.future``) or a
    :class:`concurrent.futures.Future` (the routed path)."""
    deadline = time.monotonic() + timeout
    for number in range(1, policy.max_attempts + 1):
        try:
            return _hedged_sync(attempt, policy, deadline)
        except (grpc.RpcError, StatusError) as exc:
            wait = _after_failure(policy, exc, number, deadline)
        time.sleep(wait)
    raise AssertionError("unreachable")


def _hedged_sync(attempt: Callable[[float], Any], policy: RetryPolicy, deadline: float) -> Any:
    first = attempt(max(0.001, deadline - time.monotonic()))
    if policy.hedge_after_s is None:
        return first.result()
    finished: queue.SimpleQueue[Any] = queue.SimpleQueue()
    first.add_done_callback(finished.put)
    try:  # every attempt carries the deadline, so each completes by it
        done = finished.get(
            timeout=min(policy.hedge_after_s, max(0.0, deadline - time.monotonic()))
        )
    except queue.Empty:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return first.result()
        second = attempt(remaining)
        second.add_done_callback(finished.put)
        done = finished.get()
        if done.exception() is not None:  # the first to end failed: the other has the say
            done = finished.get()
        (second if done is first else first).cancel()
    return done.result()


async def call_async(
    attempt: Callable[[float], Awaitable[T]], policy: RetryPolicy, timeout: float
) -> T:
    """asyncio: ``attempt(timeout_s)`` awaits one call."""
    deadline = time.monotonic() + timeout
    for number in range(1, policy.max_attempts + 1):
        try:
            return await _hedged_async(attempt, policy, deadline)
        except (grpc.RpcError, StatusError) as exc:
            wait = _after_failure(policy, exc, number, deadline)
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")


async def _hedged_async(
    attempt: Callable[[float], Awaitable[T]], policy: RetryPolicy, deadline: float
) -> T:
    if policy.hedge_after_s is None:
        return await attempt(max(0.001, deadline - time.monotonic()))
    first = asyncio.ensure_future(attempt(max(0.001, deadline - time.monotonic())))
    done, _ = await asyncio.wait(
        {first}, timeout=min(policy.hedge_after_s, max(0.0, deadline - time.monotonic()))
    )
    remaining = deadline - time.monotonic()
    if done or remaining <= 0:
        return await first
    second = asyncio.ensure_future(attempt(remaining))
    pending: set[asyncio.Future[T]] = {first, second}
    last: BaseException | None = None
    try:
        while pending:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for f in finished:
                if f.exception() is None:
                    return f.result()
                last = f.exception()
        assert last is not None
        raise last
    finally:
        for f in (first, second):
            if not f.done():
                f.cancel()
