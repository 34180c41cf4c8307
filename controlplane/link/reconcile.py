"""Reconcile: what one node must be told so that its copies match the placements.

Contract:
- :func:`reconcile` is pure: a function of an immutable :class:`Snapshot`, the node's id, the
  copies the node reports holding, the commands already said to it and how long its stream has
  been linked. It does no I/O and reads no clock; it returns decisions, in order, that the hub
  turns into messages (:meth:`Load.message`, :meth:`Unload.message`) and bookkeeping.
- Load for every variant placed on the node that it does not hold as specified (the spec's
  sha256 and, for a READY copy, its monitoring digest); Unload for every copy no placement puts
  on the node. A decision already said (same mark in ``said``) is not repeated: the hub clears a
  variant's mark whenever the node reports on it, so a dropped or refused command is re-told.
- Make before break: a draining node's READY copy stays until the copies that replace it are
  READY; a READY copy of a placement short of copies stays during the stream's first
  :data:`ADOPTION_GRACE_S` seconds so the leader can adopt it.
- Safety floor (:func:`exceeds_unload_floor`): one view change that would unload more than a
  bounded share of the copies the mesh holds (a store that lost its data looks like a mesh with
  nothing placed) is not acted on at once; the hub raises an alarm and holds every Unload back
  until the view asks for none (the lost models registered again) or a confirmation period
  has passed.
- Every command carries the placement revision it was decided on; the node ignores one older than
  the last it applied, so replicas whose views lag cannot undo a newer decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Final

from meshserve.common.sketches import monitoring_digest
from meshserve.controlplane.snapshot import Snapshot, VariantKey
from meshserve.protos import mesh_pb2

__all__ = [
    "ADOPTION_GRACE_S",
    "UNLOAD",
    "UNLOAD_FLOOR_MIN",
    "UNLOAD_FLOOR_SHARE",
    "Decision",
    "Load",
    "Settled",
    "Unload",
    "awaits_replacement",
    "exceeds_unload_floor",
    "load_mark",
    "load_or_settle",
    "placed_on",
    "reconcile",
    "spec_digest",
]

ADOPTION_GRACE_S: Final = 5.0  # a reconnected node's unplaced READY copies wait this long
UNLOAD: Final = "unload"  # the mark of an Unload said
_NOTHING_SAID: Mapping[VariantKey, str] = MappingProxyType({})
#: The safety floor: Unloads decided at once beyond this share of the copies held (and beyond
#: :data:`UNLOAD_FLOOR_MIN`) wait for confirmation.
UNLOAD_FLOOR_SHARE: Final = 0.5
#: So many Unloads at once are always allowed (removing a 2-copy model from a small mesh).
UNLOAD_FLOOR_MIN: Final = 2


@dataclass(frozen=True, slots=True)
class Load:
    """Tell the node to load ``spec`` as ``key`` (or to replace the copy it holds)."""

    key: VariantKey
    spec: mesh_pb2.ModelSpec
    revision: int  # the placement revision the decision is based on
    mark: str  # what to remember as said (:func:`load_mark`)

    def message(self) -> mesh_pb2.ControlMessage:
        spec = self.spec
        return mesh_pb2.ControlMessage(
            load=mesh_pb2.LoadModel(
                model=spec.name,
                variant=spec.variant or self.key[1],
                artifact_uri=spec.artifact_uri,
                sha256=spec.sha256,
                execution_providers=spec.execution_providers,
                serving=spec.serving,
                placement_revision=self.revision,
                drift_reference=spec.drift_reference,
                version=spec.version,  # "" = the implicit version
                accuracy=spec.accuracy,
            )
        )


@dataclass(frozen=True, slots=True)
class Unload:
    """Tell the node to drop its copy of ``key``."""

    key: VariantKey
    revision: int

    @property
    def mark(self) -> str:
        return UNLOAD

    def message(self) -> mesh_pb2.ControlMessage:
        return mesh_pb2.ControlMessage(
            unload=mesh_pb2.UnloadModel(
                model=self.key[0], variant=self.key[1], placement_revision=self.revision
            )
        )


@dataclass(frozen=True, slots=True)
class Settled:
    """The node holds ``key`` as placed: nothing to send; remember ``mark`` as said."""

    key: VariantKey
    mark: str


Decision = Load | Unload | Settled


def spec_digest(key: VariantKey, spec: mesh_pb2.ModelSpec) -> str:
    """The monitoring digest a copy of ``spec`` reports once loaded (``key`` unused: the
    signature of a memo keyed by variant)."""
    del key
    return monitoring_digest(spec.serving.monitoring, spec.drift_reference)


def load_mark(spec: mesh_pb2.ModelSpec, digest: str) -> str:
    """The mark of a Load of ``spec``: changes whenever the artifact or monitoring does."""
    return f"load:{spec.sha256.lower()}:{digest}"


def load_or_settle(
    key: VariantKey,
    spec: mesh_pb2.ModelSpec,
    copy: mesh_pb2.CopyStatus | None,
    said: Mapping[VariantKey, str],
    digest: Callable[[VariantKey, mesh_pb2.ModelSpec], str],
    *,
    revision: int,
) -> Load | Settled | None:
    """For a variant the node should hold as ``spec``: Settled when its ``copy`` is that
    artifact (and, once READY, that monitoring), else a Load (stamped ``revision``) unless that
    very Load was said already (None: nothing to send)."""
    wanted = digest(key, spec)
    mark = load_mark(spec, wanted)
    if (
        copy is not None
        and copy.sha256 == spec.sha256.lower()
        and (copy.monitoring_digest == wanted or copy.state != mesh_pb2.READY)
    ):
        return Settled(key, mark)
    if said.get(key) != mark:
        return Load(key, spec, revision, mark)
    return None


def placed_on(snapshot: Snapshot, node_id: str) -> Sequence[VariantKey]:
    """The variants whose placement names ``node_id``, in placement order (an index built once
    per snapshot, so one node's reconcile reads its own placements, not all of them; shared:
    not to be mutated)."""
    return snapshot.derived("link.placed_on", partial(_placed_on, snapshot)).get(node_id, ())


def _placed_on(snapshot: Snapshot) -> dict[str, list[VariantKey]]:
    by_node: dict[str, list[VariantKey]] = {}
    for key, placement in snapshot.placements.items():
        for node_id in placement.nodes:
            placed = by_node.get(node_id)
            if placed is None:
                by_node[node_id] = [key]
            elif placed[-1] is not key:  # a node named twice by one placement: once
                placed.append(key)
    return by_node


def awaits_replacement(snapshot: Snapshot, node_id: str, key: VariantKey) -> bool:
    """Make before break: whether a draining node's copy of ``key`` must stay because the copies
    that replace it are not READY yet (as many as the placement names elsewhere, bounded by its
    desired copies, at least one), so a drain never leaves a variant without a ready copy; the
    gateway routes to it only while it is the last. False for a node not draining and for a
    variant whose placement is gone (nothing to hand over)."""
    if node_id not in snapshot.draining:
        return False
    placement = snapshot.placements.get(key)
    if placement is None:
        return False
    others = [n for n in placement.nodes if n != node_id and n not in snapshot.draining]
    ready = {n.node_id for n in snapshot.ready_nodes(key)}
    want = max(1, min(len(others), placement.desired_copies or len(others)))
    return sum(n in ready for n in others) < want


def exceeds_unload_floor(
    unloads: int,
    held: int,
    *,
    share: float = UNLOAD_FLOOR_SHARE,
    minimum: int = UNLOAD_FLOOR_MIN,
) -> bool:
    """Whether ``unloads`` copies decided for unloading at once, out of ``held`` copies the
    mesh's linked nodes hold, are more than the floor allows (then: hold them, alarm)."""
    return unloads > minimum and unloads > share * held


def reconcile(
    snapshot: Snapshot,
    node_id: str,
    held: Mapping[VariantKey, mesh_pb2.CopyStatus],
    *,
    said: Mapping[VariantKey, str] = _NOTHING_SAID,
    linked_s: float = math.inf,
    digest: Callable[[VariantKey, mesh_pb2.ModelSpec], str] = spec_digest,
) -> tuple[Decision, ...]:
    """The decisions that move node ``node_id`` towards ``snapshot``'s placements.

    ``held``: the copies the node reports (its Hello, then every CopyStatus). ``said``: the mark
    of the last command per variant the hub sent and the node has not reported on since.
    ``linked_s``: seconds since the node's stream was linked (the adoption grace).
    ``digest``: the monitoring digest of a spec (a memo of :func:`spec_digest` may be passed).

    Returns the Loads (in placement order, with a :class:`Settled` for each variant the node
    holds as placed) then the Unloads (in ``held`` order). The caller sends each command and
    records its ``mark`` in ``said`` once sent; a command it could not send is decided again.
    """
    decisions: list[Decision] = []
    for key in placed_on(snapshot, node_id):
        spec = snapshot.models.get(key)
        if spec is None:
            continue
        decision = load_or_settle(
            key, spec, held.get(key), said, digest, revision=snapshot.placement_revision(key)
        )
        if decision is not None:
            decisions.append(decision)
    fresh = linked_s < ADOPTION_GRACE_S
    for key, copy in held.items():
        current = snapshot.placements.get(key)
        # A copy goes only when its placement is gone or names other nodes; a removed model's
        # placement is deleted by the leader, and that deletion is the decision. In a stream's
        # first seconds, a READY copy of a placement short of copies stays: the leader adopts it
        # (a node back from a network cut keeps serving, nothing is loaded twice); a later
        # reconcile unloads it after the grace if it was not adopted.
        short = current is not None and len(current.nodes) < current.desired_copies
        ready = copy.state == mesh_pb2.READY
        if (
            (current is not None and node_id in current.nodes)
            or (short and fresh and ready)
            or said.get(key) == UNLOAD
            or (ready and awaits_replacement(snapshot, node_id, key))
        ):
            continue
        decisions.append(Unload(key, snapshot.placement_revision(key)))
    return tuple(decisions)
