"""Gateway admission (pure): in-flight limits per model and client, refusals with a hint."""

from __future__ import annotations

import random

import grpc
import pytest

from meshserve.client._retry import RetryPolicy
from meshserve.common.errors import ResourceExhausted, from_code
from meshserve.controlplane.dataplane.admission import Admission


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_model_admits_per_copy_times_ready_copies_then_refuses_at_once() -> None:
    admission = Admission(per_copy=2, per_client=0)
    tickets = [admission.admit("m", copies=2, client="a") for _ in range(4)]
    with pytest.raises(ResourceExhausted) as info:
        admission.admit("m", copies=2, client="a")
    assert "limit 2 per ready copy x 2" in info.value.message
    assert info.value.retry_after_s is not None and info.value.retry_after_s >= 0.01
    tickets[0].release()
    tickets[0].release()  # idempotent: releases once
    assert admission.in_flight("m") == 3
    admission.admit("m", copies=2, client="a")  # a slot freed
    assert admission.refused == 1


def test_a_client_is_limited_across_models_and_others_are_not() -> None:
    admission = Admission(per_copy=0, per_client=3)
    for model in ("a", "b", "c"):
        admission.admit(model, copies=1, client="greedy")
    with pytest.raises(ResourceExhausted, match="client has 3 queries in flight"):
        admission.admit("d", copies=1, client="greedy")
    admission.admit("d", copies=1, client="polite")


def test_the_hint_follows_the_models_answer_time_within_bounds() -> None:
    clock = Clock()
    admission = Admission(per_copy=1, per_client=0, clock=clock)
    ticket = admission.admit("m", copies=1)
    clock.now += 0.4
    ticket.release()
    admission.admit("m", copies=1)
    with pytest.raises(ResourceExhausted) as info:
        admission.admit("m", copies=1)
    assert info.value.retry_after_s == pytest.approx(0.8)  # 0.4 s mean x (1 + 1/1)


def test_the_hint_survives_a_hop_in_the_message() -> None:
    error = ResourceExhausted("queue full", 0.25)
    assert error.message.endswith("retry after 250 ms")
    again = from_code(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], error.message)
    assert isinstance(again, ResourceExhausted) and again.retry_after_s == 0.25
    assert ResourceExhausted("message too large").retry_after_s is None


def test_retry_delays_are_jittered_capped_and_never_before_the_hint() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.4, rng=random.Random(7))
    delays = [policy.delay(n) for n in range(1, 8) for _ in range(50)]
    assert 0 <= min(delays) and max(delays) <= 0.4
    assert len({round(d, 6) for d in delays}) > 100  # jittered, not a fixed schedule
    assert all(0.3 <= policy.delay(1, hint_s=0.3) <= 0.45 for _ in range(50))


def test_only_load_refusals_with_a_hint_are_retried_among_resource_exhausted() -> None:
    policy = RetryPolicy()
    assert policy.retriable_error(ResourceExhausted("full", 0.05))
    assert not policy.retriable_error(ResourceExhausted("message larger than max"))
    assert policy.retriable_error(from_code(grpc.StatusCode.UNAVAILABLE.value[0], "gone"))
    assert not policy.retriable_error(from_code(grpc.StatusCode.INVALID_ARGUMENT.value[0], "x"))
