"""Placement plugins: one per file, each a pure function of the pass's NodeTable and a Candidate.

A *filter* returns a boolean mask of the rows it accepts and, for explanations, the reason it
rejects one row. A *score* returns, for the given rows, values in [0, 1] (higher is better); the
pipeline weights and sums them. An *eviction* step says which copies to take off one node so
that a copy of a variant short of its minimum fits there; the scheduler asks it node by node,
best-scored first, and applies the first answer.

Every hook is pure: it reads the immutable snapshot and the table, never changes them, does no
I/O, and never raises for "no fit" (a filter rejects, a score is 0, an eviction step answers
``()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.placement.policies.table import Candidate, NodeTable
from meshserve.controlplane.snapshot import Snapshot, VariantKey

__all__ = ["Evict", "Filter", "Resident", "Score", "Shortfall", "Victim"]


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


@dataclass(frozen=True, slots=True)
class Resident:
    """A copy on the node in question that may be evicted: its variant keeps at least its
    minimum copies without it (so any subset of a node's residents may go together)."""

    key: VariantKey
    footprint: float  # bytes its eviction frees


@dataclass(frozen=True, slots=True)
class Shortfall:
    """One eviction question: a copy of ``c.key`` needs ``missing`` more bytes on ``row``."""

    snapshot: Snapshot
    table: NodeTable
    c: Candidate  # the variant short of its minimum
    row: int
    missing: float  # bytes to free: always > 0
    residents: tuple[Resident, ...]  # what may go, in variant-key order


@dataclass(frozen=True, slots=True)
class Victim:
    key: VariantKey  # the variant whose copy on the node goes
    value: float  # what keeping it was worth, in the plugin's own unit (shown in events)


class Evict(Protocol):
    name: str

    def victims(self, q: Shortfall) -> tuple[Victim, ...]:
        """Copies of ``q.residents`` to evict from ``q.row``, freeing at least ``q.missing``
        bytes; ``()`` when this plugin will not free enough there (the scheduler then asks
        about the next node). An answer that names a non-resident, names one twice or frees
        too little is treated as ``()``."""
        ...
