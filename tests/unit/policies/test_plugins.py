"""Every filter and score plugin as a table of cases on hand-built node tables (pure, fast).

A case is one row: what the table and the candidate look like (:class:`Given`), and what the
plugin must answer. Each plugin has its own table; a plugin without one fails
``test_every_plugin_has_a_table``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest

from meshserve.common.policy.rule import Rule
from meshserve.controlplane.placement.policies.pipeline import FILTER_PLUGINS, SCORE_PLUGINS
from tests.support.views import GiB, node
from tests.unit.policies.builders import Given

GPU = ("CPUExecutionProvider", "CUDAExecutionProvider")
EDGE, CORE = {"tier": "edge"}, {"tier": "core"}


@dataclass(frozen=True)
class FilterCase:
    plugin: str
    title: str
    given: Given
    accepted: tuple[str, ...]  # node ids the filter accepts, in row order
    reasons: Mapping[str, str] = field(default_factory=dict)  # node id -> its reason


@dataclass(frozen=True)
class ScoreCase:
    plugin: str
    title: str
    given: Given
    scores: tuple[float, ...]  # every node's score, in row order, rounded to 4 places


FILTER_CASES = [
    # -- not_draining
    FilterCase(
        "not_draining",
        "a draining node is rejected and says so, the others pass",
        Given((node("a"), node("b")), draining=("b",)),
        ("a",),
        {"b": "the node is draining"},
    ),
    FilterCase(
        "not_draining",
        "with nothing draining every node passes",
        Given((node("a"), node("b"))),
        ("a", "b"),
    ),
    # -- not_failed
    FilterCase(
        "not_failed",
        "a node where a copy of the variant failed before is not retried",
        Given((node("a"), node("b")), failed=("a",)),
        ("b",),
        {"a": "a copy of this variant failed on the node before"},
    ),
    FilterCase(
        "not_failed",
        "with no failure recorded every node passes",
        Given((node("a"), node("b"))),
        ("a", "b"),
    ),
    # -- selector
    FilterCase(
        "selector",
        "only nodes carrying the selector's label pass, and the reason says which",
        Given((node("a", labels=EDGE), node("b", labels=CORE)), selector=EDGE),
        ("a",),
        {
            "b": "node_selector {'tier': 'edge'} not matched (node has {'tier': 'core'}; "
            "labels are set with meshctl nodes label)"
        },
    ),
    FilterCase(
        "selector",
        "a selector value no node carries rejects every node",
        Given((node("a", labels=EDGE), node("b", labels=CORE)), selector={"tier": "nowhere"}),
        (),
    ),
    FilterCase(
        "selector",
        "a selector of two labels needs both on the node",
        Given(
            (node("a", labels={**EDGE, "zone": "z1"}), node("b", labels=EDGE)),
            selector={**EDGE, "zone": "z1"},
        ),
        ("a",),
        {
            "b": "node_selector {'zone': 'z1'} not matched (node has {'tier': 'edge'}; "
            "labels are set with meshctl nodes label)"
        },
    ),
    FilterCase(
        "selector",
        "an empty selector accepts every node",
        Given((node("a", labels=EDGE), node("b"))),
        ("a", "b"),
    ),
    # -- providers
    FilterCase(
        "providers",
        "a node lacking a required execution provider is rejected, the reason names it",
        Given((node("a"), node("b", providers=GPU)), providers=("CUDAExecutionProvider",)),
        ("b",),
        {
            "a": "lacks execution provider(s) ['CUDAExecutionProvider'] "
            "(has ['CPUExecutionProvider'])"
        },
    ),
    FilterCase(
        "providers",
        "a variant requiring no provider may go anywhere",
        Given((node("a"), node("b", providers=GPU))),
        ("a", "b"),
    ),
    # -- anti_affinity
    FilterCase(
        "anti_affinity",
        "a node carrying an avoided label is rejected, the reason names the label",
        Given((node("a", labels=EDGE), node("b", labels=CORE)), rule=Rule(avoid_labels=EDGE)),
        ("b",),
        {"a": "carries avoided label(s) {'tier': 'edge'}"},
    ),
    FilterCase(
        "anti_affinity",
        "a rule avoiding no label accepts every node",
        Given((node("a", labels=EDGE), node("b", labels=CORE))),
        ("a", "b"),
    ),
    FilterCase(
        "anti_affinity",
        "one avoided pair of several is enough to reject",
        Given(
            (node("a", labels={"zone": "z9"}), node("b", labels=CORE)),
            rule=Rule(avoid_labels={"tier": "edge", "zone": "z9"}),
        ),
        ("b",),
    ),
    # -- fits_memory
    FilterCase(
        "fits_memory",
        "memory already placed counts and a node of unknown memory is never full",
        Given(
            (node("a", memory=2 * GiB), node("b", memory=8 * GiB), node("c", memory=0)),
            placed={"b": (7 * GiB,)},
            footprint=1.5 * GiB,
        ),
        ("a", "c"),
        {"b": "needs 1536.0 MiB, 1024.0 MiB free"},
    ),
    FilterCase(
        "fits_memory",
        "a copy exactly the size of the free memory fits",
        Given((node("a", memory=2 * GiB), node("b", memory=1 * GiB)), footprint=2 * GiB),
        ("a",),
        {"b": "needs 2048.0 MiB, 1024.0 MiB free"},
    ),
    FilterCase(
        "fits_memory",
        "a copy of unknown size fits even on a full node",
        Given((node("a", memory=1 * GiB),), placed={"a": (1 * GiB,)}),
        ("a",),
    ),
]

SCORE_CASES = [
    # -- least_loaded: 1 / (1 + copies + in flight / 4)
    ScoreCase(
        "least_loaded",
        "fewer copies and less traffic score higher (a copy, 8 in flight, idle)",
        Given((node("a"), node("b"), node("c")), placed={"a": (0,)}, in_flight={"b": 8.0}),
        (0.5, 0.3333, 1.0),
    ),
    ScoreCase(
        "least_loaded",
        "identical idle nodes score the same, the top mark",
        Given((node("a"), node("b"))),
        (1.0, 1.0),
    ),
    # -- bin_packing: share of memory used once the copy is placed
    ScoreCase(
        "bin_packing",
        "the fuller node scores higher",
        Given(
            (node("a", memory=8 * GiB), node("b", memory=8 * GiB)),
            placed={"b": (6 * GiB,)},
            footprint=1 * GiB,
        ),
        (0.125, 0.875),
    ),
    ScoreCase(
        "bin_packing",
        "a node of unknown memory scores 0 and an overfull one is capped at 1",
        Given((node("a", memory=0), node("b", memory=1 * GiB)), footprint=2 * GiB),
        (0.0, 1.0),
    ),
    # -- load_cost: share of memory left free once the copy is placed
    ScoreCase(
        "load_cost",
        "the node left least pressed by the copy scores higher",
        Given((node("a", memory=4 * GiB), node("b", memory=64 * GiB)), footprint=2 * GiB),
        (0.5, 0.9688),
    ),
    ScoreCase(
        "load_cost",
        "a node of unknown memory scores 1 and one the copy overfills scores 0",
        Given((node("a", memory=0), node("b", memory=1 * GiB)), footprint=2 * GiB),
        (1.0, 0.0),
    ),
    # -- affinity: share of prefer_labels the node carries
    ScoreCase(
        "affinity",
        "the score is the share of preferred labels matched",
        Given(
            (
                node("a", labels={**EDGE, "zone": "z1"}),
                node("b", labels=EDGE),
                node("c", labels=CORE),
            ),
            rule=Rule(prefer_labels={**EDGE, "zone": "z1"}),
        ),
        (1.0, 0.5, 0.0),
    ),
    ScoreCase(
        "affinity",
        "a rule preferring no label scores every node 0",
        Given((node("a", labels=EDGE), node("b"))),
        (0.0, 0.0),
    ),
    # -- spread: 1 / (1 + copies of the variant already in the node's spread_by domain)
    ScoreCase(
        "spread",
        "a zone without a copy scores higher than the holder's zone",
        Given(
            (
                node("a", labels={"zone": "z1"}),
                node("b", labels={"zone": "z1"}),
                node("c", labels={"zone": "z2"}),
            ),
            holders=("a",),
        ),
        (0.5, 0.5, 1.0),
    ),
    ScoreCase(
        "spread",
        "nodes without the spread_by label form one domain of their own",
        Given((node("a"), node("b"), node("c", labels={"zone": "z1"})), holders=("a",)),
        (0.5, 0.5, 1.0),
    ),
    ScoreCase(
        "spread",
        "before the first copy every node scores 1",
        Given((node("a", labels={"zone": "z1"}), node("b", labels={"zone": "z2"}))),
        (1.0, 1.0),
    ),
    ScoreCase(
        "spread",
        "spread_by '' turns spreading off: every node scores 1",
        Given(
            (node("a", labels={"zone": "z1"}), node("b", labels={"zone": "z1"})),
            rule=Rule(spread_by=""),
            holders=("a",),
        ),
        (1.0, 1.0),
    ),
    # -- demand_locality: share of the variant's demand from the node's spread_by domain
    ScoreCase(
        "demand_locality",
        "a node scores the share of the demand coming from its zone",
        Given(
            (node("a", labels={"zone": "z1"}), node("b", labels={"zone": "z2"})),
            demand={"z2": 9.0, "z1": 1.0},
        ),
        (0.1, 0.9),
    ),
    ScoreCase(
        "demand_locality",
        "demand from a zone with no node still counts in the total",
        Given(
            (node("a", labels={"zone": "z1"}), node("b", labels={"zone": "z2"})),
            demand={"z3": 3.0, "z1": 1.0},
        ),
        (0.25, 0.0),
    ),
    ScoreCase(
        "demand_locality",
        "with no demand observed every node scores 0",
        Given((node("a", labels={"zone": "z1"}), node("b", labels={"zone": "z2"}))),
        (0.0, 0.0),
    ),
    ScoreCase(
        "demand_locality",
        "spread_by '' turns it off: every node scores 0",
        Given(
            (node("a", labels={"zone": "z1"}), node("b", labels={"zone": "z2"})),
            rule=Rule(spread_by=""),
            demand={"z1": 1.0},
        ),
        (0.0, 0.0),
    ),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=[f"{c.plugin}: {c.title}" for c in FILTER_CASES])
def test_filter(case: FilterCase) -> None:
    table, c = case.given.build()
    plugin = FILTER_PLUGINS[case.plugin]
    mask = plugin.accept(table, c)
    assert mask.shape == (len(table),) and mask.dtype == np.bool_
    assert tuple(table.ids[i] for i in np.flatnonzero(mask)) == case.accepted
    for node_id, reason in case.reasons.items():
        assert node_id not in case.accepted, "a reason is only asked for a rejected node"
        assert plugin.reason(table, c, table.index[node_id]) == reason


@pytest.mark.parametrize("case", SCORE_CASES, ids=[f"{c.plugin}: {c.title}" for c in SCORE_CASES])
def test_score(case: ScoreCase) -> None:
    table, c = case.given.build()
    values = SCORE_PLUGINS[case.plugin].score(table, c, np.arange(len(table)))
    assert ((values >= 0) & (values <= 1)).all(), f"{case.plugin} left [0, 1]: {values}"
    assert tuple(round(float(v), 4) for v in values) == case.scores


@pytest.mark.parametrize("case", SCORE_CASES, ids=[f"{c.plugin}: {c.title}" for c in SCORE_CASES])
def test_a_score_of_some_rows_is_the_same_as_in_the_full_table(case: ScoreCase) -> None:
    """The pipeline scores only the feasible rows: a row's score must not depend on which
    other rows are asked about."""
    table, c = case.given.build()
    rows = np.arange(len(table))[::-1][: max(1, len(table) - 1)]
    values = SCORE_PLUGINS[case.plugin].score(table, c, rows)
    assert tuple(round(float(v), 4) for v in values) == tuple(case.scores[r] for r in rows)


def test_every_plugin_has_a_table() -> None:
    for plugins, cases in ((FILTER_PLUGINS, FILTER_CASES), (SCORE_PLUGINS, SCORE_CASES)):
        counts = {name: sum(c.plugin == name for c in cases) for name in plugins}
        assert all(n >= 2 for n in counts.values()), f"plugins with fewer than 2 cases: {counts}"
        assert {c.plugin for c in cases} <= set(plugins), "a case names an unknown plugin"
