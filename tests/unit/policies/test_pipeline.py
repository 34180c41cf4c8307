"""The placement pipeline (filter -> score -> select, and its explanations) on hand-built node
tables (pure, fast). Each plugin's own table of cases is in test_plugins.py / test_eviction.py."""

from __future__ import annotations

import pytest

from meshserve.common.policy.rule import Rule
from meshserve.controlplane.placement.policies.pipeline import HOLDS, choose, explain
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


def test_copies_chosen_in_one_call_see_each_other_so_spread_moves_the_second_zone() -> None:
    t = table_of(
        node("a1", labels={"zone": "a"}),
        node("a2", labels={"zone": "a"}),
        node("b1", labels={"zone": "b"}),
    )
    assert choose(t, cand(t), 2) == [0, 2], "a1, then b1: a2 shares a1's zone"
    assert choose(t, cand(t), 3) == [0, 2, 1], "every node once, the second zone before a2"
    no_spread = Rule(weights={"least_loaded": 1.0})
    assert choose(t, cand(t, rule=no_spread), 2) == [0, 1], "without spread: node order"


def test_explain_marks_holders_as_holding_a_copy_not_as_rejected_for_memory() -> None:
    # a holds the copy and is full because of it; b is empty.
    t = table_of(node("a", memory=1 * GiB), node("b"), placed={"a": (0.9 * GiB,)})
    c = cand(t, footprint=0.9 * GiB, holders=("a",))
    verdicts = {v.node_id: v for v in explain(t, c, 0)}
    assert verdicts["a"].feasible and verdicts["a"].reason == HOLDS
    assert verdicts["a"].filtered_by == "" and verdicts["a"].selected
    assert verdicts["b"].feasible and not verdicts["b"].selected, "no copy missing: none chosen"
    assert explain(t, c, 1)[1].node_id == "b" and explain(t, c, 1)[1].selected


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
