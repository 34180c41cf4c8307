"""Filter: a draining node gets no new copies (its copies move elsewhere)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class NotDraining:
    name = "not_draining"

    def accept(self, table: NodeTable, c: Candidate) -> npt.NDArray[np.bool_]:
        return ~table.draining

    def reason(self, table: NodeTable, c: Candidate, row: int) -> str:
        return "the node is draining"
