"""Filter: a copy that FAILED on a node (bad artifact, not loadable there) is not retried there."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class NotFailed:
    name = "not_failed"

    def accept(self, table: NodeTable, c: Candidate) -> npt.NDArray[np.bool_]:
        mask = np.ones(len(table), np.bool_)
        mask[c.failed] = False
        return mask

    def reason(self, table: NodeTable, c: Candidate, row: int) -> str:
        return "a copy of this variant failed on the node before"
