"""Filter: the node carries none of the rule's ``avoid_labels`` (hard anti-affinity)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class AntiAffinity:
    name = "anti_affinity"

    def accept(self, table: NodeTable, c: Candidate) -> npt.NDArray[np.bool_]:
        if not c.rule.avoid_labels:
            return np.ones(len(table), np.bool_)
        return ~table.any_label(c.rule.avoid_labels)

    def reason(self, table: NodeTable, c: Candidate, row: int) -> str:
        labels = table.node(row).labels
        hit = {k: v for k, v in c.rule.avoid_labels.items() if labels.get(k) == v}
        return f"carries avoided label(s) {hit}"
