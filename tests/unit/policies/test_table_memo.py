"""Columns carried from pass to pass (TableMemo) equal columns computed afresh."""

from __future__ import annotations

import random
from types import MappingProxyType

import numpy as np
import pytest

from meshserve.controlplane.placement.policies.table import NodeTable, TableMemo
from meshserve.controlplane.snapshot import NodeView, Snapshot
from tests.support.views import node

CUDA = "CUDAExecutionProvider"


def _random_node(rng: random.Random, node_id: str) -> NodeView:
    labels = {"zone": f"z{rng.randrange(4)}"}
    if rng.random() < 0.5:
        labels["tier"] = rng.choice(["core", "edge"])
    providers = ("CPUExecutionProvider", CUDA) if rng.random() < 0.3 else ("CPUExecutionProvider",)
    return node(node_id, labels=labels, providers=providers)


def _columns(table: NodeTable) -> tuple[object, ...]:
    out: list[object] = []
    for key in ("zone", "tier", "rack"):
        codes, vocab = table.label(key)
        names = {code: name for name, code in vocab.items()}
        out.append([names.get(int(c)) for c in codes])  # codes differ, values must not
    out.append(table.provider(CUDA).tolist())
    out.append(table.has_labels({"zone": "z1", "tier": "edge"}).tolist())
    return tuple(out)


@pytest.mark.parametrize("seed", range(5))
def test_a_table_built_with_the_memo_has_the_columns_of_one_built_afresh(seed: int) -> None:
    rng = random.Random(seed)
    nodes = {f"n{i:03d}": _random_node(rng, f"n{i:03d}") for i in range(60)}
    memo = TableMemo()
    carried_any = False
    for _ in range(25):
        for _ in range(rng.randrange(0, 6)):  # nodes change, leave, join
            roll, node_id = rng.random(), f"n{rng.randrange(80):03d}"
            if roll < 0.5:
                nodes[node_id] = _random_node(rng, node_id)
            elif roll < 0.8:
                nodes.pop(node_id, None)
            else:
                nodes[node_id] = _random_node(rng, node_id)
        snapshot = Snapshot(nodes=MappingProxyType(dict(nodes)))
        with_memo = NodeTable.build(snapshot, memo=memo)
        fresh = NodeTable.build(snapshot)
        assert with_memo.ids == fresh.ids
        np.testing.assert_array_equal(with_memo.memory, fresh.memory)
        if rng.random() < 0.3:  # a pass that reads no column: offered on to the next table
            continue
        assert _columns(with_memo) == _columns(fresh)
        carried_any |= memo.rows_carried > 0
    assert carried_any, "the memo never carried a row over: the test tests nothing"
