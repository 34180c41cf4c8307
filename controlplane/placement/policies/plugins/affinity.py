"""Score: the node carries the rule's ``prefer_labels`` (soft affinity: share of them matched)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class Affinity:
    name = "affinity"

    def score(
        self, table: NodeTable, c: Candidate, rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        prefer = c.rule.prefer_labels
        if not prefer:
            return np.zeros(len(rows))
        hits = np.zeros(len(rows))
        for key, value in prefer.items():
            codes, vocab = table.label(key)
            hits += codes[rows] == vocab.get(value, -2)
        return hits / len(prefer)
