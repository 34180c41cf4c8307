"""The columnar view plugins compute on: one row per node, numpy arrays per attribute.

Built once per scheduling pass from an immutable
:class:`~meshserve.controlplane.snapshot.Snapshot`; label
values are interned to integer codes so a label test over 10,000 nodes is one vectorised
comparison. ``used`` / ``copies`` / ``loads`` are the pass's working state: the planner adds to
them as it places copies, so later decisions in the same pass see earlier ones.

Label codes and provider masks are read from each node's view, which the snapshot builder keeps
as the same object while the node does not change. A :class:`TableMemo` kept by the caller
across passes carries the columns of the last table over to the next one for every row whose
view is the very same object, and computes only the other rows: at 10,000 nodes a pass pays for
the nodes that changed, not for every node. A cache only: a table built with a memo has the
same columns as one built without.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from meshserve.controlplane.snapshot import NodeView, Snapshot, VariantKey

__all__ = ["Candidate", "NodeTable", "TableMemo"]

Mask = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


@dataclass
class NodeTable:
    ids: list[str]  # sorted: row order is node-id order (deterministic tie-breaks)
    index: dict[str, int]
    memory: Floats  # bytes; 0 = unknown (never "full")
    used: Floats  # bytes placed on the node (all variants)
    copies: Ints  # copies placed on the node
    loads: Ints  # new copies given to the node in this pass (rate limit)
    in_flight: Floats  # queries in flight on the node (telemetry; 0 when unknown)
    draining: Mask
    _labels: dict[str, tuple[Ints, dict[str, int]]] = field(default_factory=dict)
    _providers: dict[str, Mask] = field(default_factory=dict)
    _nodes: list[NodeView] = field(default_factory=list)
    _carried: _Carried | None = None  # columns a TableMemo offers, taken on first use

    @classmethod
    def build(
        cls,
        snapshot: Snapshot,
        *,
        draining: Iterable[str] = (),
        in_flight: Mapping[str, float] | None = None,
        memo: TableMemo | None = None,
    ) -> NodeTable:
        """``memo``: carries columns over from the last table built with it (see the module
        doc); the new table becomes the memo's."""
        ids = sorted(snapshot.nodes)
        nodes = [snapshot.nodes[i] for i in ids]
        n = len(ids)
        last = memo.last if memo is not None else None
        if last is not None and last.ids == ids:  # the same nodes: the same (read-only) index
            ids, index = last.ids, last.index
        else:
            index = dict(zip(ids, range(n), strict=True))
        # in flight and draining are sparse (a few nodes of 10,000): set by row, not per node
        flights = np.zeros(n)
        for node_id, value in (in_flight or {}).items():
            row = index.get(node_id)
            if row is not None:
                flights[row] = value
        drain = np.zeros(n, np.bool_)
        drain[[index[i] for i in draining if i in index]] = True
        table = cls(
            ids=ids,
            index=index,
            memory=np.array([v.hardware.memory_bytes for v in nodes], np.float64),
            used=np.zeros(n),
            copies=np.zeros(n, np.int64),
            loads=np.zeros(n, np.int64),
            in_flight=flights,
            draining=drain,
            _nodes=nodes,
        )
        if memo is not None:
            memo.carry_into(table)
        return table

    def __len__(self) -> int:
        return len(self.ids)

    def node(self, row: int) -> NodeView:
        return self._nodes[row]

    def label(self, key: str) -> tuple[Ints, dict[str, int]]:
        """(codes, vocabulary) of label ``key``: code -1 = the node lacks the label."""
        cached = self._labels.get(key)
        if cached is None and self._carried is not None:
            cached = self._carried.label(self, key)
        if cached is None:
            vocab: dict[str, int] = {}
            codes = np.full(len(self.ids), -1, np.int64)
            for row, node in enumerate(self._nodes):
                value = node.labels.get(key)
                if value is not None:
                    codes[row] = vocab.setdefault(value, len(vocab))
            cached = self._labels[key] = (codes, vocab)
        return cached

    def has_labels(self, wanted: Mapping[str, str]) -> Mask:
        """Rows carrying every ``key: value`` of ``wanted``."""
        mask = np.ones(len(self.ids), np.bool_)
        for key, value in wanted.items():
            codes, vocab = self.label(key)
            mask &= codes == vocab.get(value, -2)
        return mask

    def any_label(self, avoid: Mapping[str, str]) -> Mask:
        """Rows carrying at least one ``key: value`` of ``avoid``."""
        mask = np.zeros(len(self.ids), np.bool_)
        for key, value in avoid.items():
            codes, vocab = self.label(key)
            mask |= codes == vocab.get(value, -2)
        return mask

    def provider(self, name: str) -> Mask:
        cached = self._providers.get(name)
        if cached is None and self._carried is not None:
            cached = self._carried.provider(self, name)
        if cached is None:
            cached = self._providers[name] = np.fromiter(
                (name in v.hardware.execution_providers for v in self._nodes),
                np.bool_,
                len(self.ids),
            )
        return cached

    def rows(self, node_ids: Iterable[str]) -> Ints:
        return np.fromiter((self.index[i] for i in node_ids if i in self.index), np.int64)

    def place(self, row: int, footprint: float, *, new: bool) -> None:
        self.used[row] += footprint
        self.copies[row] += 1
        if new:
            self.loads[row] += 1

    def unplace(self, row: int, footprint: float) -> None:
        self.used[row] -= footprint
        self.copies[row] -= 1


@dataclass(frozen=True)
class Candidate:
    """One placement decision's question: where should copies of ``key`` go?"""

    key: VariantKey
    spec: Any  # mesh_pb2.ModelSpec
    rule: Any  # meshserve.common.policy.rule.Rule
    footprint: float  # bytes one copy takes
    holders: Ints  # rows already holding a copy (kept): never chosen again
    failed: Ints  # rows where a copy FAILED and is not to be retried yet
    failed_reasons: Mapping[int, str] = field(default_factory=dict)  # row -> why, until when
    demand_domains: Mapping[str, float] = field(default_factory=dict)  # spread_by value -> demand


@dataclass(frozen=True, eq=False)
class _Source:
    """The rows of the table a column was computed on (not the table: no chain of tables)."""

    ids: list[str]
    index: dict[str, int]
    nodes: list[NodeView]


class _Carried:
    """Columns of earlier tables a new table may take, each with the rows it was computed on.
    A column is carried on first use: the rows whose view is the very same object keep their
    value, the others are read from their views (see the module doc)."""

    def __init__(
        self,
        labels: dict[str, tuple[_Source, Ints, dict[str, int]]],
        providers: dict[str, tuple[_Source, Mask]],
    ) -> None:
        self.labels = labels
        self.providers = providers
        self._matches: dict[int, tuple[Mask, Ints, list[int]]] = {}
        self.rows_carried = 0

    def _match(self, table: NodeTable, source: _Source) -> tuple[Mask, Ints, list[int]]:
        """(same, row in ``source`` per row, rows to read afresh) for ``table``."""
        found = self._matches.get(id(source))
        if found is None:
            n = len(table)
            if source.ids is table.ids:
                rows = np.arange(n)
            else:
                rows = np.fromiter((source.index.get(i, -1) for i in table.ids), np.int64, n)
            old = source.nodes
            same = np.fromiter(
                (r >= 0 and old[r] is v for r, v in zip(rows.tolist(), table._nodes, strict=True)),
                np.bool_,
                n,
            )
            found = (same, np.where(same, rows, 0), np.flatnonzero(~same).tolist())
            self._matches[id(source)] = found
            self.rows_carried = max(self.rows_carried, int(same.sum()))
        return found

    def label(self, table: NodeTable, key: str) -> tuple[Ints, dict[str, int]] | None:
        entry = self.labels.get(key)
        if entry is None:
            return None
        source, codes, vocab = entry
        same, rows, fresh = self._match(table, source)
        vocab = dict(vocab)
        new = np.where(same, codes[rows], -1) if len(codes) else np.full(len(table), -1)
        for row in fresh:
            value = table._nodes[row].labels.get(key)
            if value is not None:
                new[row] = vocab.setdefault(value, len(vocab))
        table._labels[key] = (new, vocab)
        return new, vocab

    def provider(self, table: NodeTable, name: str) -> Mask | None:
        entry = self.providers.get(name)
        if entry is None:
            return None
        source, mask = entry
        same, rows, fresh = self._match(table, source)
        new = np.where(same, mask[rows], False) if len(mask) else np.zeros(len(table), np.bool_)
        for row in fresh:
            new[row] = name in table._nodes[row].hardware.execution_providers
        table._providers[name] = new
        return new


class TableMemo:
    """Offers each new :class:`NodeTable` the columns of the ones before it (see the module
    doc). One per scheduling loop; not thread-safe."""

    def __init__(self) -> None:
        self.last: NodeTable | None = None

    @property
    def rows_carried(self) -> int:
        """Rows the last table took from an earlier one (0: none taken yet)."""
        carried = self.last._carried if self.last is not None else None
        return carried.rows_carried if carried is not None else 0

    def carry_into(self, table: NodeTable) -> None:
        """Offer ``table`` the columns the last table computed (or was offered and did not
        take, from the table before); then remember ``table``."""
        last, self.last = self.last, table
        if last is None:
            return
        source = _Source(last.ids, last.index, last._nodes)
        labels = {k: (source, codes, vocab) for k, (codes, vocab) in last._labels.items()}
        providers = {k: (source, mask) for k, mask in last._providers.items()}
        if last._carried is not None:  # offered to the last table, not taken: still on offer
            for key, entry in last._carried.labels.items():
                labels.setdefault(key, entry)
            for name, offered in last._carried.providers.items():
                providers.setdefault(name, offered)
        if labels or providers:
            table._carried = _Carried(labels, providers)
