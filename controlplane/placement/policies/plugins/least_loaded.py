"""Score: fewer copies placed and fewer queries in flight (spreads work evenly)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class LeastLoaded:
    name = "least_loaded"

    def score(
        self, table: NodeTable, c: Candidate, rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        load = table.copies[rows] + table.in_flight[rows] / 4.0
        return 1.0 / (1.0 + load)
