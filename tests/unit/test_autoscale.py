"""Copies follow demand (meshserve.controlplane.placement.autoscale), on hand-fed telemetry and a
fake clock."""

from __future__ import annotations

from types import MappingProxyType

from meshserve.controlplane.placement.autoscale import Autoscaler
from meshserve.controlplane.snapshot import Snapshot
from meshserve.protos import mesh_pb2

KEY = ("m", "default")


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def snap(in_flight: float, *, min_copies: int = 1, max_copies: int = 4) -> Snapshot:
    spec = mesh_pb2.ModelSpec(
        name="m",
        variant="default",
        autoscaling=mesh_pb2.Autoscaling(
            min_copies=min_copies,
            max_copies=max_copies,
            target_in_flight=2,
            scale_down_delay_s=10,
        ),
    )
    flights = {"n1": MappingProxyType({KEY: in_flight})} if in_flight else {}
    return Snapshot(models=MappingProxyType({KEY: spec}), in_flight=MappingProxyType(flights))


def test_scales_up_at_once_down_after_the_delay_within_bounds() -> None:
    clock = Clock()
    scaler = Autoscaler(clock)
    desired, changes = scaler.decide(snap(0))
    assert desired == {KEY: 1} and changes == []
    for _ in range(4):  # sustained demand of 8 in flight / target 2 -> 4 copies (max)
        clock.now += 1
        desired, _ = scaler.decide(snap(20))
    assert desired == {KEY: 4}, "capped at max_copies"
    clock.now += 1
    desired, _ = scaler.decide(snap(0))
    assert desired == {KEY: 4}, "not down at once"
    for _ in range(12):
        clock.now += 1
        desired, changes = scaler.decide(snap(0))
        if desired[KEY] < 4:
            break
    assert desired == {KEY: 1} and changes and changes[0].old == 4, "down to min after the delay"


def test_one_sample_does_not_add_a_copy_and_unscaled_models_are_left_alone() -> None:
    scaler = Autoscaler(Clock())
    desired, _ = scaler.decide(snap(3))  # smoothed: 1.5 in flight -> 1 copy
    assert desired == {KEY: 1}
    plain = Snapshot(
        models=MappingProxyType({KEY: mesh_pb2.ModelSpec(name="m", variant="default")})
    )
    assert scaler.decide(plain) == ({}, [])


def test_scale_to_zero_when_allowed() -> None:
    clock = Clock()
    scaler = Autoscaler(clock)
    for _ in range(15):
        clock.now += 1
        desired, _ = scaler.decide(snap(0, min_copies=0))
    assert desired == {KEY: 0}
