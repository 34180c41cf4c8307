"""What ``meshctl nodes list`` and ``placements list`` say about state, besides the raw records.

Pure functions of the Admin API's answers (no I/O): a node's state (``serving`` or
``draining``), and per placement how many of its copies are READY against the desired count,
flagged when fewer, with the nodes that still serve a copy no placement names (a draining node
keeps serving until a replacement is READY elsewhere: the placement already left it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from meshserve.protos import mesh_pb2

__all__ = ["Replication", "node_state", "ready_copies", "replication"]

Key = tuple[str, str]


def node_state(node: mesh_pb2.NodeInfo) -> str:
    """``draining`` while an operator drains the node, else ``serving``."""
    return "draining" if node.draining else "serving"


def ready_copies(nodes: Iterable[mesh_pb2.NodeInfo]) -> dict[Key, list[mesh_pb2.NodeInfo]]:
    """The nodes holding a READY copy of each (model, variant), in the order given."""
    out: dict[Key, list[mesh_pb2.NodeInfo]] = {}
    for node in nodes:
        for copy in node.copies:
            if copy.state == mesh_pb2.READY:
                out.setdefault((copy.model, copy.variant), []).append(node)
    return out


class Replication:
    """One placement's replication: ``ready`` of ``desired`` copies, the nodes that serve a
    copy outside the placement (``stray``: node id -> its state)."""

    def __init__(self, ready: int, desired: int, stray: Mapping[str, str]) -> None:
        self.ready = ready
        self.desired = desired
        self.stray = dict(stray)

    @property
    def under(self) -> bool:
        """Fewer READY copies where the placement puts them than desired."""
        return self.ready < self.desired

    def cell(self) -> str:
        """``ready/desired``, flagged ``under-replicated`` when short."""
        text = f"{self.ready}/{self.desired}"
        return f"{text} under-replicated" if self.under else text

    def note(self) -> str:
        """Who still serves a copy the placement no longer names, and why ("" when nobody)."""
        if not self.stray:
            return ""
        names = ", ".join(f"{n} ({s})" for n, s in sorted(self.stray.items()))
        return f"still served by {names} until a copy is READY elsewhere"


def replication(
    placement: mesh_pb2.Placement, ready: Mapping[Key, list[mesh_pb2.NodeInfo]]
) -> Replication:
    """The replication of ``placement`` given :func:`ready_copies` of the node list."""
    holders = ready.get((placement.model, placement.variant), [])
    placed = set(placement.nodes)
    count = sum(1 for n in holders if n.node_id in placed)
    stray = {n.node_id: node_state(n) for n in holders if n.node_id not in placed}
    return Replication(count, int(placement.desired_copies), stray)


def copy_state(state: int) -> str:
    """The name of a copy's state (``READY``, ``LOADING``, ...); its number when the enum has no
    name for it (a newer control plane)."""
    try:
        return mesh_pb2.CopyState.Name(state)  # type: ignore[arg-type]
    except ValueError:
        return f"STATE_{state}"
