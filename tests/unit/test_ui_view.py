"""The live map's view (controlplane/observe/ui/view.py): pure functions of a hand-built
snapshot and node telemetry -- rates from counter differences, copy states, tiers, the live mix
of variants, the SLO hit rate, and nothing secret in the document."""

from __future__ import annotations

import dataclasses
import json
from types import MappingProxyType

from meshserve.controlplane.observe.episodes import Episode
from meshserve.controlplane.observe.ui.view import Rates, SloTally, mesh_state
from meshserve.controlplane.snapshot import Snapshot
from meshserve.protos import mesh_pb2
from tests.support.views import alias, node


@dataclasses.dataclass
class _Session:
    telemetry: mesh_pb2.Telemetry


def _telemetry(unix_ms: int, **requests: int) -> mesh_pb2.Telemetry:
    t = mesh_pb2.Telemetry(unix_ms=unix_ms, rss_bytes=100, cpu_percent=12.5)
    for variant, count in requests.items():
        t.models.add(model="m", variant=variant, requests=count, latency_p50_ms=1.5)
    return t


def _snapshot() -> Snapshot:
    core = dataclasses.replace(
        node("core-1", labels={"zone": "a"}, copies={("m", "fast"): mesh_pb2.READY}),
        direct_address="127.0.0.1:7001",
    )
    edge = node(
        "edge-1",
        labels={"zone": "b"},
        copies={("m", "slow"): mesh_pb2.READY, ("m", "big"): mesh_pb2.LOADING},
    )
    pulling = edge.copies[("m", "big")]
    pulling.bytes_fetched, pulling.bytes_total = 25, 100
    specs = {
        ("m", v): mesh_pb2.ModelSpec(
            name="m",
            variant=v,
            version="v1",
            accuracy=acc,
            slo_ms=50,
            artifact_uri="s3://secret-bucket/m.onnx?X-Amz-Signature=abc",
            sha256="f" * 64,
        )
        for v, acc in (("fast", 0.9), ("slow", 0.97), ("big", 0.99))
    }
    return Snapshot(
        models=MappingProxyType(specs),
        nodes=MappingProxyType({"core-1": core, "edge-1": edge}),
        draining=frozenset({"edge-1"}),
        aliases=MappingProxyType({("m", "live"): alias("v1")}),
    )


def _state(snapshot: Snapshot, sessions: dict[str, _Session], rates: Rates, slo: SloTally):  # type: ignore[no-untyped-def]
    return mesh_state(
        snapshot=snapshot,
        sessions=sessions,
        replica=mesh_pb2.ReplicaInfo(replica_id="cp-1", address="127.0.0.1:1"),
        replicas=[mesh_pb2.ReplicaInfo(replica_id="cp-1"), mesh_pb2.ReplicaInfo(replica_id="cp-2")],
        leader="cp-2",
        episodes={("drift", "m", "slow"): Episode("drift", "m", "slow", "psi 0.4", unix_ms=5)},
        rates=rates,
        slo=slo,
        events_seq=7,
        now_ms=1,
    )


def test_rates_states_tiers_and_the_live_mix() -> None:
    snapshot, rates, slo = _snapshot(), Rates(), SloTally()
    sessions = {"core-1": _Session(_telemetry(1_000, fast=100))}  # edge-1: no stream here
    first = _state(snapshot, sessions, rates, slo)
    assert [n["rps"] for n in first["nodes"]] == [0.0, 0.0]  # one report: no rate yet
    sessions["core-1"] = _Session(_telemetry(3_000, fast=160))  # +60 in 2 s
    sessions["edge-1"] = _Session(_telemetry(3_000, slow=10))
    state = _state(snapshot, sessions, rates, slo)
    core, edge = state["nodes"]
    assert (core["tier"], core["zone"], core["tunneled"], core["linked"]) == (
        "core",
        "a",
        False,
        True,
    )
    assert (edge["tier"], edge["tunneled"], edge["draining"]) == ("edge", True, True)
    assert core["rps"] == 30.0 and core["cpu_percent"] == 12.5
    assert state["flows"] == [{"node": "core-1", "rps": 30.0, "path": "direct"}]
    states = {c["variant"]: (c["state"], c["progress"]) for c in edge["copies"]}
    assert states == {"big": ("pulling", 0.25), "slow": ("ready", None)}
    (model,) = state["models"]
    shares = {v["variant"]: v["share"] for v in model["versions"][0]["variants"]}
    assert shares == {"big": 0.0, "fast": 1.0, "slow": 0.0}
    assert model["aliases"][0]["alias"] == "live" and model["slo_ms"] == 50
    assert model["alarms"] == [
        {"kind": "drift", "variant": "slow", "message": "psi 0.4", "since_ms": 5}
    ]
    assert state["replica"]["leader"] is False
    assert [r["leader"] for r in state["replicas"]] == [False, True]
    # the same report again keeps its rate; a counter that went back starts over
    assert _state(snapshot, sessions, rates, slo)["nodes"][0]["rps"] == 30.0
    sessions["core-1"] = _Session(_telemetry(4_000, fast=5))
    assert _state(snapshot, sessions, rates, slo)["nodes"][0]["rps"] == 0.0
    text = json.dumps(state)
    assert "secret-bucket" not in text and "f" * 64 not in text  # no URI, no sha256


def test_a_node_without_a_stream_here_is_lost_with_no_load() -> None:
    state = _state(_snapshot(), {}, Rates(), SloTally())
    assert all(not n["linked"] and n["cpu_percent"] is None for n in state["nodes"])


def test_the_slo_hit_rate_is_over_the_window() -> None:
    slo = SloTally(window=3)
    assert slo.hit_rate("m") is None
    slo.update({"m": (9, 10)})
    assert slo.hit_rate("m") == 0.9
    slo.update({"m": (9, 20)})
    slo.update({"m": (19, 30)})
    assert slo.hit_rate("m") == 0.5  # (19 - 9) / (30 - 10)
    slo.update({"m": (29, 40)})
    assert slo.hit_rate("m") == 1.0  # the window moved on: (29 - 9) / (40 - 20)
    slo.update({})
    assert slo.hit_rate("m") is None
