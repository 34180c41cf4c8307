"""Filter: the node offers every execution provider the variant requires."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class Providers:
    name = "providers"

    def accept(self, table: NodeTable, c: Candidate) -> npt.NDArray[np.bool_]:
        mask = np.ones(len(table), np.bool_)
        for provider in c.spec.execution_providers:
            mask &= table.provider(provider)
        return mask

    def reason(self, table: NodeTable, c: Candidate, row: int) -> str:
        have = set(table.node(row).hardware.execution_providers)
        missing = [p for p in c.spec.execution_providers if p not in have]
        return f"lacks execution provider(s) {missing} (has {sorted(have)})"
