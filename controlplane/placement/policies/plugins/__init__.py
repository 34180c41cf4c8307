"""Placement plugins: one per file, each a pure function of a NodeTable and a Candidate.

A *filter* returns a boolean mask of the rows it accepts and, for explanations, the reason it
rejects one row. A *score* returns, for the given rows, values in [0, 1] (higher is better); the
pipeline weights and sums them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable

__all__ = ["Filter", "Score"]


class Filter(Protocol):
    name: str

    def accept(self, table: NodeTable, c: Candidate) -> npt.NDArray[np.bool_]:
        """A mask over every row of ``table``: True = the node may hold a copy."""
        ...

    def reason(self, table: NodeTable, c: Candidate, row: int) -> str:
        """Why ``row`` is rejected (called only for explanations)."""
        ...


class Score(Protocol):
    name: str

    def score(
        self, table: NodeTable, c: Candidate, rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        """Values in [0, 1] for ``rows`` (feasible nodes), higher = better."""
        ...
