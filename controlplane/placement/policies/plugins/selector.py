"""Filter: the node carries every label of the model's ``node_selector`` (hard affinity).

The labels are the ones placement believes (admin-side, ``meshctl nodes label``; a node's own
claims only with ``--trust-node-labels``): the reason says where they are set."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class Selector:
    name = "selector"

    def accept(self, table: NodeTable, c: Candidate) -> npt.NDArray[np.bool_]:
        return table.has_labels(c.spec.node_selector)

    def reason(self, table: NodeTable, c: Candidate, row: int) -> str:
        labels = table.node(row).labels
        missing = {k: v for k, v in c.spec.node_selector.items() if labels.get(k) != v}
        return (
            f"node_selector {missing} not matched (node has {dict(labels)}; "
            "labels are set with meshctl nodes label)"
        )
