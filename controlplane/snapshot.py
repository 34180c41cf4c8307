"""Building the immutable :class:`~meshserve.common.routing.view.Snapshot` from the etcd mirrors.

Policies (scheduler, router) are functions of a Snapshot; nothing in here does I/O. The view
itself lives in :mod:`meshserve.common.routing.view` (the SDK routes over the same type).

A node's labels in the view (what placement matches and routing reads ``zone`` from) are its
admin-side labels (``keys.NODE_LABELS``, set by ``meshctl nodes label``); the labels a node
claims in its Hello count only when the control plane trusts them (``trust_node_labels``), and
an admin label always wins over a claimed one (:func:`effective_labels`). A node's claimed
hardware is used as it says, except that the admin labels ``max-memory-mb`` and
``max-cpu-cores`` cap it (:func:`effective_hardware`): a claim can then only lower the capacity
placement counts on.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from google.protobuf.message import Message

from meshserve.common.routing.view import HOLDERS, NodeView, Snapshot, VariantKey
from meshserve.controlplane import keys
from meshserve.protos import mesh_pb2

__all__ = [
    "EMBEDDED",
    "MAX_CPU_CORES",
    "MAX_MEMORY_MB",
    "NodeView",
    "Snapshot",
    "SnapshotBuilder",
    "VariantKey",
    "effective_hardware",
    "effective_labels",
]

#: Admin labels that cap what a node claims of its hardware (whole numbers).
MAX_MEMORY_MB = "max-memory-mb"
MAX_CPU_CORES = "max-cpu-cores"
#: ``Hello.kind`` of an embedded member (an application running models through the SDK): its
#: link records go to ``Snapshot.members``, never to ``Snapshot.nodes`` (nothing is placed on or
#: routed to it). A node claiming it only keeps itself out of placement and routing.
EMBEDDED = "embedded"

M = TypeVar("M", bound=Message)

_RANK = {mesh_pb2.READY: 3, mesh_pb2.FAILED: 3, mesh_pb2.LOADING: 2, mesh_pb2.UNLOADED: 1}


class SnapshotBuilder:
    """Builds snapshots incrementally: a value is decoded only when its bytes changed since the
    last build, and a node's view is merged again only when one of its link records changed.
    Told which link and node-label keys changed since the last build (``changed``, from the
    mirrors' journals), a rebuild touches only those nodes: with 10,000 nodes a rebuild after
    one record changed costs a dictionary copy, not a walk over 10,000 records. Not
    thread-safe; one per control-plane replica."""

    def __init__(self) -> None:
        self._decoded: dict[str, tuple[bytes, Any]] = {}
        self._views: dict[str, tuple[tuple[bytes, ...], NodeView]] = {}
        self._links: dict[str, dict[str, bytes]] = {}  # node id -> its link records
        self._nodes: dict[str, NodeView] = {}
        self._members: dict[str, NodeView] = {}  # embedded members (Hello.kind EMBEDDED)
        self._holders: dict[str, NodeView] = {}  # nodes holding a copy (Snapshot.holders)
        self._kinds: dict[str, str] = {}  # Hello.kind per node id, as its records say
        self._trust: bool | None = None

    def _decode(self, key: str, value: bytes, factory: Callable[[], M]) -> M:
        cached = self._decoded.get(key)
        if cached is not None and cached[0] == value:
            message: M = cached[1]
            return message
        decoded = keys.decode(value, factory())
        self._decoded[key] = (value, decoded)
        return decoded

    def build(
        self,
        models: Mapping[str, bytes],
        placements: Mapping[str, bytes],
        links: Mapping[str, bytes],
        *,
        placement_revisions: Mapping[str, int] | None = None,
        placements_revision: int = 0,
        draining: Mapping[str, bytes] | None = None,
        wake: Mapping[str, bytes] | None = None,
        aliases: Mapping[str, bytes] | None = None,
        node_labels: Mapping[str, bytes] | None = None,
        trust_node_labels: bool = False,
        changed: Collection[str] | None = None,
    ) -> Snapshot:
        """``node_labels``: the admin-side labels (values under ``keys.NODE_LABELS``);
        ``trust_node_labels``: whether labels a node claims count too (see the module doc);
        ``changed``: the keys of ``links`` and ``node_labels`` that changed since the last
        build (None: unknown, every node is looked at)."""
        admin_keys = node_labels or {}
        model_map: dict[VariantKey, mesh_pb2.ModelSpec] = {}
        for key, value in models.items():
            model_map[keys.split_key(key, keys.MODELS)] = self._decode(
                key, value, mesh_pb2.ModelSpec
            )
        placement_map: dict[VariantKey, mesh_pb2.Placement] = {}
        for key, value in placements.items():
            placement_map[keys.split_key(key, keys.PLACEMENTS)] = self._decode(
                key, value, mesh_pb2.Placement
            )
        if changed is None or self._trust != trust_node_labels:
            self._all_nodes(links, admin_keys, trust_node_labels)
        else:
            self._some_nodes(links, admin_keys, trust_node_labels, changed)
        self._trust = trust_node_labels
        nodes, members = self._nodes, self._members
        alias_map = {
            keys.split_key(key, keys.ALIASES): self._decode(key, value, mesh_pb2.Alias)
            for key, value in (aliases or {}).items()
        }
        if changed is None:  # (a partial build drops the decoded values of the keys it saw go)
            live = set(models) | set(placements) | set(links) | set(aliases or ()) | set(admin_keys)
            if len(self._decoded) > len(live):
                self._decoded = {k: v for k, v in self._decoded.items() if k in live}
        revisions = {
            keys.split_key(key, keys.PLACEMENTS): revision
            for key, revision in (placement_revisions or {}).items()
        }
        snapshot = Snapshot(
            MappingProxyType(model_map),
            MappingProxyType(placement_map),
            MappingProxyType(nodes),
            MappingProxyType(revisions),
            placements_revision,
            frozenset(key[len(keys.DRAINING) :] for key in (draining or {})),
            frozenset(keys.split_key(key, keys.WAKE) for key in (wake or {})),
            aliases=MappingProxyType(alias_map),
            members=MappingProxyType(members),
        )
        holders = self._holders
        snapshot.derived(HOLDERS, lambda: MappingProxyType(holders))  # kept as it changed
        return snapshot

    def _all_nodes(
        self, links: Mapping[str, bytes], admin_keys: Mapping[str, bytes], trust: bool
    ) -> None:
        grouped: dict[str, dict[str, bytes]] = {}
        for key, value in links.items():
            node_id, _ = keys.split_key(key, keys.NODES)
            grouped.setdefault(node_id, {})[key] = value
        self._links = grouped
        self._views = {n: v for n, v in self._views.items() if n in grouped}  # still cached
        self._kinds = {n: k for n, k in self._kinds.items() if n in grouped}
        self._nodes, self._members, self._holders = {}, {}, {}
        for node_id in grouped:
            self._view(node_id, admin_keys, trust)

    def _some_nodes(
        self,
        links: Mapping[str, bytes],
        admin_keys: Mapping[str, bytes],
        trust: bool,
        changed: Collection[str],
    ) -> None:
        touched: set[str] = set()
        for key in changed:
            if key.startswith(keys.NODE_LABELS):
                touched.add(key[len(keys.NODE_LABELS) :])
                if key not in admin_keys:
                    self._decoded.pop(key, None)
                continue
            node_id, _ = keys.split_key(key, keys.NODES)
            touched.add(node_id)
            value = links.get(key)
            records = self._links.setdefault(node_id, {})
            if value is None:
                records.pop(key, None)
                self._decoded.pop(key, None)
            else:
                records[key] = value
        self._nodes = dict(self._nodes)  # the last snapshot keeps its own
        self._members = dict(self._members)
        self._holders = dict(self._holders)
        for node_id in touched:
            if self._links.get(node_id):
                self._view(node_id, admin_keys, trust)
            else:
                for index in (
                    self._links,
                    self._views,
                    self._kinds,
                    self._nodes,
                    self._members,
                    self._holders,
                ):
                    index.pop(node_id, None)

    def _view(self, node_id: str, admin_keys: Mapping[str, bytes], trust: bool) -> None:
        """(Re)build one node's view from its link records, into ``_nodes`` and ``_views``."""
        records = sorted(self._links[node_id].items())
        own_key = keys.node_labels_key(node_id)
        own = admin_keys.get(own_key, b"")
        values = (*(v for _, v in records), own, b"trust" if trust else b"")
        cached = self._views.get(node_id)
        if cached is not None and cached[0] == values:
            view = cached[1]
        else:
            infos = [self._decode(k, v, mesh_pb2.NodeInfo) for k, v in records]
            own_labels = (
                self._decode(own_key, own, mesh_pb2.NodeLabels).labels
                if own_key in admin_keys
                else {}
            )
            labels = effective_labels(infos[0].labels, own_labels, trust=trust)
            hardware = effective_hardware(infos[0].hardware, own_labels)
            view = _merge(node_id, infos, labels, hardware)
            self._kinds[node_id] = infos[0].kind
        if self._kinds.get(node_id) == EMBEDDED:  # listed, never placed onto or routed to
            self._members[node_id] = view
            self._nodes.pop(node_id, None)
            self._holders.pop(node_id, None)
        else:
            self._nodes[node_id] = view
            self._members.pop(node_id, None)
            if view.copies:
                self._holders[node_id] = view
            else:
                self._holders.pop(node_id, None)
        self._views[node_id] = (values, view)


def effective_labels(
    claimed: Mapping[str, str], admin: Mapping[str, str], *, trust: bool
) -> dict[str, str]:
    """The labels placement matches: ``admin`` (set by an operator), over ``claimed`` (the
    node's Hello) only when ``trust`` (``--trust-node-labels``)."""
    return {**claimed, **admin} if trust else dict(admin)


def effective_hardware(claimed: mesh_pb2.Hardware, admin: Mapping[str, str]) -> mesh_pb2.Hardware:
    """``claimed`` capped by the admin labels :data:`MAX_MEMORY_MB` and :data:`MAX_CPU_CORES`
    (a claim of 0, "unknown", becomes the cap); ``claimed`` itself when neither is set."""
    memory_mb = _whole(admin.get(MAX_MEMORY_MB), (1 << 44) - 1)
    cores = _whole(admin.get(MAX_CPU_CORES), (1 << 32) - 1)
    if memory_mb is None and cores is None:
        return claimed
    out = mesh_pb2.Hardware()
    out.CopyFrom(claimed)
    if memory_mb is not None:
        cap = memory_mb << 20
        out.memory_bytes = min(out.memory_bytes, cap) if out.memory_bytes else cap
    if cores is not None:
        out.cpu_cores = min(out.cpu_cores, cores) if out.cpu_cores else cores
    return out


def _whole(text: str | None, limit: int) -> int | None:
    """A whole number label (at most ``limit``); None when absent or not one."""
    return min(int(text), limit) if text is not None and text.isascii() and text.isdigit() else None


def _merge(
    node_id: str,
    infos: list[mesh_pb2.NodeInfo],
    labels: dict[str, str],
    hardware: mesh_pb2.Hardware,
) -> NodeView:
    """One view of a node from the link records every replica holding its stream wrote."""
    copies: dict[VariantKey, mesh_pb2.CopyStatus] = {}
    for info in infos:
        for status in info.copies:
            key = (status.model, status.variant)
            old = copies.get(key)
            if old is None or _RANK.get(status.state, 0) > _RANK.get(old.state, 0):
                copies[key] = status
    first = infos[0]
    return NodeView(
        node_id=node_id,
        labels=MappingProxyType(labels),
        hardware=hardware,
        direct_address=first.direct_address,
        replicas=frozenset(r for info in infos for r in info.replicas),
        copies=MappingProxyType(copies),
    )
