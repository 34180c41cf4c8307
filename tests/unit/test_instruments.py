"""The metric instruments with an in-memory reader: shared observables read every live owner and
forget dead ones; the node's and control plane's instruments report what they are told."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Mapping

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)

from meshserve.common.instruments import Reading, SharedObservable
from meshserve.controlplane.observe.metrics import ControlPlaneMetrics
from meshserve.node.metrics import NodeMetrics

Points = dict[tuple[tuple[str, object], ...], float]


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> MeterProvider:
    return MeterProvider(metric_readers=[reader])


def points(reader: InMemoryMetricReader, name: str) -> Points:
    """``name``'s data points by sorted attributes: values, or counts for histograms."""
    data = reader.get_metrics_data()
    out: Points = {}
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    key = tuple(sorted((point.attributes or {}).items()))
                    if isinstance(point, HistogramDataPoint):
                        out[key] = point.count
                    elif isinstance(point, NumberDataPoint):
                        out[key] = point.value
    return out


class Owner:
    def __init__(self, name: str, value: float) -> None:
        self.name, self.value = name, value


def read_owner(owner: Owner) -> Iterable[Reading]:
    return [(owner.value, {"owner": owner.name})]


def test_a_shared_observable_reads_every_live_owner_and_forgets_dead_ones(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    gauge = SharedObservable(provider.get_meter("t"), "t.gauge", "gauge", "1", "test")
    a, b = Owner("a", 1.0), Owner("b", 2.0)
    gauge.watch(a, read_owner)
    gauge.watch(b, read_owner)
    assert points(reader, "t.gauge") == {(("owner", "a"),): 1.0, (("owner", "b"),): 2.0}
    del b
    gc.collect()
    a.value = 3.0
    assert points(reader, "t.gauge") == {(("owner", "a"),): 3.0}


def test_an_owner_whose_read_fails_does_not_hide_the_others(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    counter = SharedObservable(provider.get_meter("t"), "t.counter", "counter", "1", "test")

    def broken(owner: Owner) -> Iterable[Reading]:
        raise RuntimeError("broken source")

    good, bad = Owner("good", 5.0), Owner("bad", 0.0)
    counter.watch(bad, broken)
    counter.watch(good, read_owner)
    assert points(reader, "t.counter") == {(("owner", "good"),): 5.0}


class FakeAgent:
    def __init__(self) -> None:
        self.telemetry_bytes_sent = {"cp-a:1": 100, "cp-b:1": 40}


def test_node_metrics_per_copy_and_per_link(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    node = NodeMetrics(provider.get_meter("meshserve.node"))
    copy = node.copy("mlp", "default")
    copy.queued(0.002)
    copy.queued(0.0)
    copy.batched(rows=5, requests=2)
    copy.cache(hit=True)
    copy.cache(hit=False)
    copy.cache(hit=False)
    copy.loaded(1.5, None)  # skipped warm-up: no warm-up sample
    copy.unloaded("placement")
    node.reconnected("cp-a:1")
    agent = FakeAgent()
    node.watch_telemetry(agent)
    mlp = (("model", "mlp"), ("variant", "default"))
    assert points(reader, "meshserve.queue.duration") == {mlp: 2}
    assert points(reader, "meshserve.batch.size") == {mlp: 1}
    assert points(reader, "meshserve.cache.hits") == {mlp: 1}
    assert points(reader, "meshserve.cache.misses") == {mlp: 2}
    assert points(reader, "meshserve.copy.load.duration") == {mlp: 1}
    assert points(reader, "meshserve.copy.warmup.duration") == {}
    unloaded = (("model", "mlp"), ("reason", "placement"), ("variant", "default"))
    assert points(reader, "meshserve.copy.unloads") == {unloaded: 1}
    assert points(reader, "meshserve.link.reconnects") == {(("replica", "cp-a:1"),): 1}
    assert points(reader, "meshserve.telemetry.sent") == {
        (("replica", "cp-a:1"),): 100,
        (("replica", "cp-b:1"),): 40,
    }


class FakeHub:
    def __init__(self, sessions: Mapping[str, object]) -> None:
        self.replica_id = "cp-1"
        self.sessions = sessions


def test_control_plane_metrics_count_decisions_and_streams(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    cp = ControlPlaneMetrics(provider.get_meter("meshserve.controlplane"))
    cp.placed(("mlp", "default"), before=["n1", "n2"], after=["n2", "n3", "n4"])
    cp.evicted(("big", "default"))
    cp.decided(("gone", "default"), "remove")
    cp.decided(("mlp", "default"), "scale", 0)  # nothing decided: nothing counted
    cp.scheduled(0.004)
    hub = FakeHub({"n1": object(), "n2": object()})
    cp.watch_streams(hub)

    def key(model: str, action: str) -> tuple[tuple[str, object], ...]:
        return (("action", action), ("model", model), ("variant", "default"))

    assert points(reader, "meshserve.placement.decisions") == {
        key("mlp", "place"): 2,
        key("mlp", "unplace"): 1,
        key("big", "evict"): 1,
        key("gone", "remove"): 1,
    }
    assert points(reader, "meshserve.copy.evictions") == {
        (("model", "big"), ("variant", "default")): 1
    }
    assert points(reader, "meshserve.scheduler.duration") == {(): 1}
    assert points(reader, "meshserve.node_streams") == {(("replica", "cp-1"),): 2}
