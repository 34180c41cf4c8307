"""Every placement plugin and the pipeline, on hand-built snapshots (pure, fast)."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest

from meshserve.common.policy.rule import Rule
from meshserve.controlplane.placement.policies.pipeline import (
    FILTER_PLUGINS,
    SCORE_PLUGINS,
    choose,
    explain,
)
from meshserve.controlplane.placement.policies.table import Candidate, NodeTable
from meshserve.controlplane.snapshot import NodeView, Snapshot
from meshserve.protos import mesh_pb2
from tests.support.views import GiB, node

KEY = ("m", "default")


def table_of(*nodes: NodeView, draining: tuple[str, ...] = ()) -> NodeTable:
    snap = Snapshot(nodes=MappingProxyType({n.node_id: n for n in nodes}))
    return NodeTable.build(snap, draining=draining)


def cand(
    table: NodeTable,
    *,
    rule: Rule | None = None,
    footprint: float = 0.0,
    holders: tuple[str, ...] = (),
    failed: tuple[str, ...] = (),
    selector: dict[str, str] | None = None,
    providers: tuple[str, ...] = (),
    demand: dict[str, float] | None = None,
) -> Candidate:
    spec = mesh_pb2.ModelSpec(
        name="m", variant="default", node_selector=selector or {}, execution_providers=providers
    )
    return Candidate(
        key=KEY,
        spec=spec,
        rule=rule or Rule(),
        footprint=footprint,
        holders=table.rows(holders),
        failed=table.rows(failed),
        demand_domains=demand or {},
    )


def accepted(name: str, table: NodeTable, c: Candidate) -> list[str]:
    mask = FILTER_PLUGINS[name].accept(table, c)
    return [table.ids[i] for i in np.flatnonzero(mask)]


# -- filters ---------------------------------------------------------------------------------


def test_not_draining() -> None:
    t = table_of(node("a"), node("b"), draining=("b",))
    assert accepted("not_draining", t, cand(t)) == ["a"]
    assert FILTER_PLUGINS["not_draining"].reason(t, cand(t), 1) == "the node is draining"


def test_not_failed() -> None:
    t = table_of(node("a"), node("b"))
    assert accepted("not_failed", t, cand(t, failed=("a",))) == ["b"]


def test_selector_and_its_reason() -> None:
    t = table_of(node("a", labels={"tier": "edge"}), node("b", labels={"tier": "core"}))
    c = cand(t, selector={"tier": "edge"})
    assert accepted("selector", t, c) == ["a"]
    assert "tier" in FILTER_PLUGINS["selector"].reason(t, c, 1)
    assert accepted("selector", t, cand(t, selector={"tier": "nowhere"})) == []


def test_providers() -> None:
    gpu = ("CPUExecutionProvider", "CUDAExecutionProvider")
    t = table_of(node("a"), node("b", providers=gpu))
    c = cand(t, providers=("CUDAExecutionProvider",))
    assert accepted("providers", t, c) == ["b"]
    assert "CUDAExecutionProvider" in FILTER_PLUGINS["providers"].reason(t, c, 0)


def test_anti_affinity() -> None:
    t = table_of(node("a", labels={"tier": "edge"}), node("b", labels={"tier": "core"}))
    c = cand(t, rule=Rule(avoid_labels={"tier": "edge"}))
    assert accepted("anti_affinity", t, c) == ["b"]
    assert accepted("anti_affinity", t, cand(t)) == ["a", "b"]


def test_fits_memory_counts_what_is_placed_and_unknown_memory_never_fills() -> None:
    t = table_of(node("a", memory=2 * GiB), node("b", memory=8 * GiB), node("c", memory=0))
    t.place(1, 7 * GiB, new=False)
    c = cand(t, footprint=1.5 * GiB)
    assert accepted("fits_memory", t, c) == ["a", "c"]
    assert "MiB free" in FILTER_PLUGINS["fits_memory"].reason(t, c, 1)


# -- scores ----------------------------------------------------------------------------------


def scores(name: str, table: NodeTable, c: Candidate) -> list[float]:
    rows = np.arange(len(table))
    values = SCORE_PLUGINS[name].score(table, c, rows)
    assert ((values >= 0) & (values <= 1)).all(), f"{name} left [0, 1]: {values}"
    return [round(float(v), 4) for v in values]


def test_least_loaded_prefers_fewer_copies_and_less_traffic() -> None:
    t = table_of(node("a"), node("b"), node("c"))
    t.place(0, 0, new=False)
    t.in_flight[1] = 8.0
    s = scores("least_loaded", t, cand(t))
    assert s[2] > s[0] and s[2] > s[1]


def test_bin_packing_prefers_the_fuller_node() -> None:
    t = table_of(node("a", memory=8 * GiB), node("b", memory=8 * GiB))
    t.place(1, 6 * GiB, new=False)
    s = scores("bin_packing", t, cand(t, footprint=1 * GiB))
    assert s[1] > s[0]


def test_load_cost_prefers_the_node_left_least_pressed() -> None:
    t = table_of(node("a", memory=4 * GiB), node("b", memory=64 * GiB))
    s = scores("load_cost", t, cand(t, footprint=2 * GiB))
    assert s[1] > s[0]


def test_affinity_scores_the_share_of_preferred_labels() -> None:
    t = table_of(
        node("a", labels={"tier": "edge", "zone": "z1"}),
        node("b", labels={"tier": "edge"}),
        node("c", labels={"tier": "core"}),
    )
    c = cand(t, rule=Rule(prefer_labels={"tier": "edge", "zone": "z1"}))
    assert scores("affinity", t, c) == [1.0, 0.5, 0.0]


def test_spread_prefers_zones_without_a_copy() -> None:
    t = table_of(
        node("a", labels={"zone": "z1"}),
        node("b", labels={"zone": "z1"}),
        node("c", labels={"zone": "z2"}),
    )
    s = scores("spread", t, cand(t, holders=("a",)))
    assert s[2] > s[1]


def test_demand_locality_follows_the_demand() -> None:
    t = table_of(node("a", labels={"zone": "z1"}), node("b", labels={"zone": "z2"}))
    s = scores("demand_locality", t, cand(t, demand={"z2": 9.0, "z1": 1.0}))
    assert s == [0.1, 0.9]


# -- the pipeline ----------------------------------------------------------------------------


def test_choose_filters_then_orders_by_weighted_score_deterministically() -> None:
    t = table_of(
        node("a", labels={"tier": "edge"}),
        node("b", labels={"tier": "core"}),
        node("c", labels={"tier": "edge"}),
        node("d", labels={"tier": "edge"}),
        draining=("d",),
    )
    rule = Rule(weights={"affinity": 1.0}, prefer_labels={"tier": "core"})
    assert choose(t, cand(t, rule=rule), 2) == [1, 0]  # b by affinity, then a before c (tie)
    assert choose(t, cand(t, rule=rule, holders=("b",)), 5) == [0, 2]  # holders never again
    assert choose(t, cand(t), 0) == []


def test_choose_respects_the_per_pass_load_limit() -> None:
    t = table_of(node("a"), node("b"))
    t.place(0, 0, new=True)
    t.place(0, 0, new=True)
    rule = Rule(max_loads_per_node=2)
    assert choose(t, cand(t, rule=rule), 2) == [1]


def test_explain_names_the_first_rejecting_filter_and_the_scores() -> None:
    t = table_of(
        node("a", memory=1 * GiB, labels={"tier": "edge"}),
        node("b", labels={"tier": "core"}),
        node("c", labels={"tier": "edge"}),
    )
    c = cand(t, footprint=2 * GiB, selector={"tier": "edge"})
    verdicts = {v.node_id: v for v in explain(t, c, 1)}
    assert verdicts["b"].filtered_by == "selector" and not verdicts["b"].feasible
    assert verdicts["a"].filtered_by == "fits_memory"
    assert verdicts["c"].feasible and verdicts["c"].selected
    assert set(verdicts["c"].scores) == {"least_loaded", "spread"}


def test_unknown_plugins_and_negative_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown filter"):
        Rule(filters=("nope",))
    with pytest.raises(ValueError, match="unknown score"):
        Rule(weights={"nope": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        Rule(weights={"spread": -1.0})


def test_ten_thousand_nodes_one_decision_is_vectorised() -> None:
    nodes = [node(f"n{i:05d}", labels={"zone": f"z{i % 10}"}) for i in range(10_000)]
    t = table_of(*nodes)
    picked = choose(t, cand(t, footprint=GiB, holders=("n00000",)), 3)
    assert len(picked) == 3 and len(set(picked)) == 3
    zones = {t.node(r).labels["zone"] for r in picked}
    assert "z0" not in zones, "spread keeps new copies out of the holder's zone"
