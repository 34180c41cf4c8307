"""Filter: the copy's footprint fits in the node's memory minus what is already placed there.

A node that did not report its memory (0) is never considered full.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class FitsMemory:
    name = "fits_memory"

    def accept(self, table: NodeTable, c: Candidate) -> npt.NDArray[np.bool_]:
        if c.footprint <= 0:
            return np.ones(len(table), np.bool_)
        fits: npt.NDArray[np.bool_] = (table.memory == 0) | (
            table.memory - table.used >= c.footprint
        )
        return fits

    def reason(self, table: NodeTable, c: Candidate, row: int) -> str:
        free = table.memory[row] - table.used[row]
        return f"needs {c.footprint / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free"
