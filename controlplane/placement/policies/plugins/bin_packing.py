"""Score: fuller nodes first (most memory already used after placing), keeping big nodes free
for big models and letting idle nodes be reclaimed."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class BinPacking:
    name = "bin_packing"

    def score(
        self, table: NodeTable, c: Candidate, rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        memory = table.memory[rows]
        used = table.used[rows] + c.footprint
        with np.errstate(divide="ignore", invalid="ignore"):
            fill = np.where(memory > 0, used / memory, 0.0)
        return np.clip(fill, 0.0, 1.0)
