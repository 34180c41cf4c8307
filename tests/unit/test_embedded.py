"""Embedded mode's pure parts: what the control plane tells an embedded member
(controlplane/link/embedded.py, a table of cases over hand-built snapshots), that members stay
out of placement and routing (controlplane/snapshot.py), which copy answers on the member
(client/_member.serving_table) and the SDK's embedded list (client/_embedded.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import MappingProxyType

import pytest

from meshserve.client._embedded import EmbeddedModel, embedded_models
from meshserve.client._member import serving_table
from meshserve.controlplane import keys
from meshserve.controlplane.link.embedded import reconcile_embedded, target_version
from meshserve.controlplane.link.reconcile import Load, Settled, Unload, load_mark, spec_digest
from meshserve.controlplane.snapshot import Snapshot, SnapshotBuilder, VariantKey
from meshserve.node.copy_entry import CopyEntry
from meshserve.node.metrics import node_metrics
from meshserve.protos import mesh_pb2
from tests.support.views import alias

READY, LOADING = mesh_pb2.READY, mesh_pb2.LOADING
A, B, C = "a" * 64, "b" * 64, "c" * 64


def spec(variant: str, version: str, sha: str = A, accuracy: float = 0.0) -> mesh_pb2.ModelSpec:
    return mesh_pb2.ModelSpec(
        name="m",
        variant=variant,
        version=version,
        artifact_uri=f"file:///{variant}.onnx",
        sha256=sha,
        accuracy=accuracy,
    )


def held(variant: str, state: int, sha: str = A) -> mesh_pb2.CopyStatus:
    s = spec(variant, "")
    return mesh_pb2.CopyStatus(
        model="m",
        variant=variant,
        state=state,  # type: ignore[arg-type]
        sha256=sha,
        monitoring_digest=spec_digest(("m", variant), s),
    )


V1 = spec("v1", "v1", A)
V2 = spec("v2", "v2", B)
V2_SMALL = spec("v2-small", "v2", C)


@dataclass(frozen=True)
class Case:
    name: str
    specs: tuple[mesh_pb2.ModelSpec, ...]
    held: dict[VariantKey, mesh_pb2.CopyStatus]
    expect: list[tuple[str, str]]  # (kind, variant) in order
    live: str | None = "v1"
    wants: tuple[mesh_pb2.EmbeddedModel, ...] = (mesh_pb2.EmbeddedModel(model="m"),)
    said: dict[VariantKey, str] = field(default_factory=dict)


CASES = [
    Case("a new member loads every variant of the live version", (V1, V2), {}, [("load", "v1")]),
    Case(
        "a member holding the live version as registered is settled",
        (V1, V2),
        {("m", "v1"): held("v1", READY)},
        [("settled", "v1")],
    ),
    Case(
        "a rollout loads the new version and keeps the old one until it is READY",
        (V1, V2, V2_SMALL),
        {("m", "v1"): held("v1", READY), ("m", "v2"): held("v2", LOADING, B)},
        [("settled", "v2"), ("load", "v2-small")],
        live="v2",
    ),
    Case(
        "once one variant of the new version is READY the old version goes",
        (V1, V2),
        {("m", "v1"): held("v1", READY), ("m", "v2"): held("v2", READY, B)},
        [("settled", "v2"), ("unload", "v1")],
        live="v2",
    ),
    Case(
        "a rollback is a rollout back: the old version loads again, the new one stays until then",
        (V1, V2),
        {("m", "v2"): held("v2", READY, B)},
        [("load", "v1")],
        live="v1",
    ),
    Case(
        "a pinned version ignores the alias",
        (V1, V2),
        {},
        [("load", "v2")],
        wants=(mesh_pb2.EmbeddedModel(model="m", version="v2"),),
    ),
    Case(
        "another alias is followed when named",
        (V1, V2),
        {},
        [("load", "v1")],
        wants=(mesh_pb2.EmbeddedModel(model="m", alias="stable"),),
    ),
    Case(
        "no version to run (alias at an unregistered version): what is held stays",
        (V1,),
        {("m", "v1"): held("v1", READY)},
        [],
        live="v9",
    ),
    Case(
        "a copy of a model the member does not declare is unloaded",
        (V1,),
        {("m", "v1"): held("v1", READY)},
        [("unload", "v1")],
        wants=(),
    ),
    Case(
        "a Load already said is not repeated",
        (V1,),
        {},
        [],
        said={("m", "v1"): load_mark(V1, spec_digest(("m", "v1"), V1))},
    ),
    Case(
        "a copy with another artifact than registered is loaded afresh",
        (V1,),
        {("m", "v1"): held("v1", READY, C)},
        [("load", "v1")],
    ),
]


def snapshot_of(case: Case) -> Snapshot:
    aliases = {}
    if case.live is not None:
        aliases[("m", "live")] = alias(case.live)
        aliases[("m", "stable")] = alias("v1", name="stable")
    return Snapshot(
        models=MappingProxyType({("m", s.variant): s for s in case.specs}),
        aliases=MappingProxyType(aliases),
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reconcile_embedded(case: Case) -> None:
    decisions = reconcile_embedded(snapshot_of(case), case.wants, case.held, said=case.said)
    kinds = {Load: "load", Unload: "unload", Settled: "settled"}
    assert [(kinds[type(d)], d.key[1]) for d in decisions] == case.expect
    for d in decisions:
        if isinstance(d, Load | Unload):
            assert d.revision == 0  # no placement decides it: applied in arrival order
    loads = [d.message().load for d in decisions if isinstance(d, Load)]
    for load in loads:  # the member learns each variant's version and accuracy
        assert load.version == case_spec(case, load.variant).version


def case_spec(case: Case, variant: str) -> mesh_pb2.ModelSpec:
    return next(s for s in case.specs if s.variant == variant)


def test_without_an_alias_the_only_version_is_run() -> None:
    snapshot = Snapshot(models=MappingProxyType({("m", "v1"): V1}))
    assert target_version(snapshot, mesh_pb2.EmbeddedModel(model="m")) == "v1"
    two = Snapshot(models=MappingProxyType({("m", "v1"): V1, ("m", "v2"): V2}))
    assert target_version(two, mesh_pb2.EmbeddedModel(model="m")) is None


def test_an_embedded_member_is_listed_apart_from_the_nodes_placement_and_routing_see() -> None:
    copy = mesh_pb2.CopyStatus(model="m", variant="v1", state=READY, sha256=A)
    records = {
        keys.node_link_key("n1", "cp"): mesh_pb2.NodeInfo(node_id="n1", copies=[copy]),
        keys.node_link_key("app", "cp"): mesh_pb2.NodeInfo(
            node_id="app", kind="embedded", copies=[copy]
        ),
    }
    links = {k: keys.encode(v) for k, v in records.items()}
    models = {keys.model_key("m", "v1"): keys.encode(V1)}
    snapshot = SnapshotBuilder().build(models, {}, links)
    assert set(snapshot.nodes) == {"n1"} and set(snapshot.members) == {"app"}
    assert [n.node_id for n in snapshot.ready_nodes(("m", "v1"))] == ["n1"]


def entry(variant: str, state: int = READY) -> CopyEntry:
    e = CopyEntry("m", variant, A, state=state, instruments=node_metrics().copy("m", variant))
    e.copy = object()  # type: ignore[assignment]  # only "loaded or not" is read
    return e


def test_the_member_serves_the_newest_version_named_once_it_is_ready() -> None:
    versions = {("m", "v1"): ("v1", 0.9, 1), ("m", "v2"): ("v2", 0.8, 2)}
    old, new = entry("v1"), entry("v2", LOADING)
    table = serving_table([old, new], versions, {"m": "v2"})
    assert table["m"].version == "v1"  # v2 still warming: v1 answers
    new.state = READY
    table = serving_table([old, new], versions, {"m": "v2"})
    assert table["m"].version == "v2" and table["m"].entries == (new,)
    assert table["m"].held["v1"] is old  # a query may still name v1 until it is unloaded


def test_the_most_accurate_variant_of_the_version_answers_first() -> None:
    versions = {("m", "fast"): ("v2", 0.7, 1), ("m", "big"): ("v2", 0.9, 2)}
    fast, big = entry("fast"), entry("big")
    served = serving_table([fast, big], versions, {"m": "v2"})["m"]
    assert served.entries == (big, fast)
    assert [s.accuracy for s in served.specs] == [0.9, 0.7]
    assert served.held["v2"] is big and served.held["fast"] is fast


def test_embedded_models_are_named_once() -> None:
    assert embedded_models(["a", EmbeddedModel("b", version="v2")]) == (
        EmbeddedModel("a"),
        EmbeddedModel("b", version="v2"),
    )
    with pytest.raises(ValueError, match="twice"):
        embedded_models(["a", "a"])
    with pytest.raises(ValueError, match="name"):
        embedded_models([""])


def test_importing_the_sdk_loads_neither_the_node_runtime_nor_onnxruntime() -> None:
    """Embedded mode costs nothing until a client names embedded models."""
    import subprocess
    import sys

    code = (
        "import sys, meshserve.client\n"
        "print(sorted(m for m in sys.modules if m.startswith(('meshserve.node', 'onnxruntime'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_local_slo_switches_variants_by_the_profiles_the_member_measured() -> None:
    from meshserve.client._embedded import EmbeddedOptions
    from meshserve.client._member import Member
    from meshserve.common.errors import FailedPrecondition

    versions = {("m", "fast"): ("v2", 0.7, 1), ("m", "big"): ("v2", 0.9, 2)}
    fast, big = entry("fast"), entry("big")
    fast.latency_profile, big.latency_profile = [(1, 0.001)], [(1, 0.010)]
    member = Member(
        seeds=[], wants=[EmbeddedModel("m")], options=EmbeddedOptions(), tls=None,
        max_message_bytes=1 << 20,
    )  # fmt: skip
    member._table = serving_table([fast, big], versions, {"m": "v2"})  # not started: no loop
    deadline = time.monotonic() + 1
    assert member.pick("m", "", None, None, deadline) is big  # no SLO: the most accurate
    assert member.pick("m", "", 5.0, None, deadline) is fast  # 10 ms does not fit 5 ms
    assert member.pick("m", "", 100.0, None, deadline) is big
    assert member.pick("m", "fast", None, None, deadline) is fast  # a variant named
    with pytest.raises(FailedPrecondition, match="min_accuracy"):
        member.pick("m", "", None, 0.95, deadline)
