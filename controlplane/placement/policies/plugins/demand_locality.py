"""Score: the node's ``spread_by`` domain is where the variant's demand comes from (its share of
the demand observed there), so edge copies land near the queries they serve."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable


class DemandLocality:
    name = "demand_locality"

    def score(
        self, table: NodeTable, c: Candidate, rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        total = sum(c.demand_domains.values())
        if not c.rule.spread_by or total <= 0:
            return np.zeros(len(rows))
        codes, vocab = table.label(c.rule.spread_by)
        share = np.zeros(len(vocab) + 1)
        for domain, demand in c.demand_domains.items():
            code = vocab.get(domain)
            if code is not None:
                share[code + 1] = demand / total
        return share[codes[rows] + 1]
