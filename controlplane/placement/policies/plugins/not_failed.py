"""Filter: a node where a copy of the variant FAILED is not a candidate until its failure
record says so (see :mod:`meshserve.controlplane.placement.failures`): a transient failure is
retried after a backoff, a permanent one waits for a new artifact or ``meshctl placements
retry``. The reason names the failure and when (or how) the node is tried again."""

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
        return c.failed_reasons.get(row, "a copy of this variant failed on the node before")
