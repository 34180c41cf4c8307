"""The placement pipeline (filter -> score -> select, and its explanations) on hand-built node
tables (pure, fast). Each plugin's own table of cases is in test_plugins.py / test_eviction.py."""

from __future__ import annotations

import pytest

from meshserve.common.policy.rule import Rule
from meshserve.controlplane.placement.policies.pipeline import choose, explain
from tests.support.views import GiB, node
from tests.unit.policies.builders import cand, table_of

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
    t = table_of(node("a"), node("b"), loads={"a": 2})
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
