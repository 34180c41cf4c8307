"""Score: fewer copies of this variant already in the node's ``spread_by`` domain (e.g. zone),
so losing one domain loses as few copies as possible. Nodes without the label form one domain."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class Spread:
    name = "spread"

    def score(
        self, table: NodeTable, c: Candidate, rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        if not c.rule.spread_by or len(c.holders) == 0:
            return np.ones(len(rows))
        codes, vocab = table.label(c.rule.spread_by)
        held = np.bincount(codes[c.holders] + 1, minlength=len(vocab) + 1)
        return np.asarray(1.0 / (1.0 + held[codes[rows] + 1]), np.float64)
