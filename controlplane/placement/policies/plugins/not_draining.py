"""Filter: a draining node gets no new copies (its copies move elsewhere; a READY copy keeps
serving there until its replacement is READY, which the reason says)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable
from meshserve.protos import mesh_pb2


class NotDraining:
    name = "not_draining"

    def accept(self, table: NodeTable, c: Candidate) -> npt.NDArray[np.bool_]:
        return ~table.draining

    def reason(self, table: NodeTable, c: Candidate, row: int) -> str:
        status = table.node(row).copies.get(c.key)
        if status is not None and status.state == mesh_pb2.READY:
            return "the node is draining; it still serves its copy until one is READY elsewhere"
        return "the node is draining"
