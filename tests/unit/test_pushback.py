"""Retry pushback (issue 17 item 6): the SDK waits as long as the server asks, under gRPC's own
``grpc-retry-pushback-ms`` first, else ``retry-after-ms``; a negative pushback stops retrying;
the idempotent reads are retried by gRPC itself (the service config the SDK sets), shown against
a real in-process gRPC server."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from meshserve.client import MeshClient
from meshserve.client._retry import (
    NO_RETRY,
    RetryPolicy,
    call_sync,
    retry_hint,
    service_config,
    translate,
)
from meshserve.common.errors import StatusError
from meshserve.protos import inference_pb2


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, *trailing: tuple[str, str]) -> None:
        self._code, self._trailing = code, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "busy on purpose"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


@pytest.mark.parametrize(
    ("trailing", "expected"),
    [
        ((("grpc-retry-pushback-ms", "250"),), 0.25),
        ((("retry-after-ms", "40"),), 0.04),
        ((("retry-after-ms", "40"), ("grpc-retry-pushback-ms", "250")), 0.25),  # standard wins
        ((("grpc-retry-pushback-ms", "-1"),), math.inf),  # A6: do not retry
        ((("grpc-retry-pushback-ms", "soon"),), math.inf),
        ((("retry-after-ms", "soon"),), None),
        ((), None),
    ],
)
def test_the_hint_prefers_the_standard_key(
    trailing: tuple[tuple[str, str], ...], expected: float | None
) -> None:
    assert retry_hint(trailing) == expected


def test_the_retry_delay_honours_the_pushback() -> None:
    error = translate(
        _Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, ("grpc-retry-pushback-ms", "300"))
    )
    hint = error.retry_after_s  # type: ignore[attr-defined]
    policy = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.001)
    assert policy.retriable_error(error)
    assert all(0.3 <= policy.delay(attempt, hint) <= 0.45 for attempt in range(1, 6))


def test_a_call_waits_the_pushback_before_its_next_attempt() -> None:
    started: list[float] = []

    def attempt(remaining: float) -> Any:
        started.append(time.monotonic())
        done: futures.Future[str] = futures.Future()
        if len(started) == 1:
            pushback = ("grpc-retry-pushback-ms", "200")
            done.set_exception(_Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, pushback))
        else:
            done.set_result("answer")
        return done

    assert call_sync(attempt, RetryPolicy(initial_backoff_s=0.001), timeout=5.0) == "answer"
    assert started[1] - started[0] >= 0.2


def test_a_negative_pushback_stops_the_retries() -> None:
    calls = 0

    def attempt(remaining: float) -> Any:
        nonlocal calls
        calls += 1
        done: futures.Future[str] = futures.Future()
        done.set_exception(_Failed(grpc.StatusCode.UNAVAILABLE, ("grpc-retry-pushback-ms", "-1")))
        return done

    with pytest.raises(StatusError):
        call_sync(attempt, RetryPolicy(), timeout=5.0)
    assert calls == 1


def test_the_service_config_covers_only_the_idempotent_reads() -> None:
    assert service_config(NO_RETRY) == ""
    config = json.loads(service_config(RetryPolicy(max_attempts=9)))
    (method_config,) = config["methodConfig"]
    methods = {name["method"] for name in method_config["name"]}
    assert "ModelInfer" not in methods and {"ModelReady", "ModelMetadata"} <= methods
    assert method_config["retryPolicy"]["maxAttempts"] == 5  # gRPC's cap
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


class _Flaky(grpc.GenericRpcHandler):
    """``ModelReady`` answers UNAVAILABLE with a pushback ``refusals`` times, then ready."""

    def __init__(self, refusals: int, pushback_ms: int) -> None:
        self.refusals = refusals
        self.pushback_ms = pushback_ms
        self.calls: list[float] = []
        self._lock = threading.Lock()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        if details.method != "/inference.GRPCInferenceService/ModelReady":
            return None
        return grpc.unary_unary_rpc_method_handler(
            self._ready,
            request_deserializer=inference_pb2.ModelReadyRequest.FromString,
            response_serializer=inference_pb2.ModelReadyResponse.SerializeToString,
        )

    def _ready(
        self, request: inference_pb2.ModelReadyRequest, context: grpc.ServicerContext
    ) -> inference_pb2.ModelReadyResponse:
        with self._lock:
            self.calls.append(time.monotonic())
            refuse = len(self.calls) <= self.refusals
        if refuse:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(self.pushback_ms)),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return inference_pb2.ModelReadyResponse(ready=True)


@pytest.fixture
def flaky() -> Iterator[tuple[_Flaky, str]]:
    handler = _Flaky(refusals=2, pushback_ms=150)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield handler, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_grpc_itself_retries_a_read_after_the_pushback(flaky: tuple[_Flaky, str]) -> None:
    handler, address = flaky
    with MeshClient(address, routing="gateway", retry=RetryPolicy(max_attempts=3)) as client:
        assert client.model_ready("m", timeout=10.0)
    assert len(handler.calls) == 3
    gaps = [b - a for a, b in zip(handler.calls, handler.calls[1:], strict=False)]
    assert all(gap >= 0.15 for gap in gaps), gaps  # gRPC waited as the server asked


def test_without_retries_a_read_fails_at_once(flaky: tuple[_Flaky, str]) -> None:
    handler, address = flaky
    with MeshClient(address, routing="gateway", retry=NO_RETRY) as client:
        with pytest.raises(StatusError):
            client.model_ready("m", timeout=10.0)
    assert len(handler.calls) == 1
