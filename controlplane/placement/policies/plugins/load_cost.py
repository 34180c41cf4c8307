"""Score: cheap to load there: the copy leaves the node's memory least pressed (a nearly full
node would have to evict to take it later, and loads slower under memory pressure)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class LoadCost:
    name = "load_cost"

    def score(
        self, table: NodeTable, c: Candidate, rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        memory = table.memory[rows]
        free_after = memory - table.used[rows] - c.footprint
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(memory > 0, free_after / memory, 1.0)
        return np.clip(share, 0.0, 1.0)
