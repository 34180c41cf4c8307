"""An in-memory :class:`~meshserve.controlplane.registry.Registry` for unit tests.

It keeps the same keys and values as the etcd registry (``data``: key -> value, with a revision
per write), applies every call atomically (one coroutine step: no await inside a call, so no
race can interleave it) and raises the same domain errors. Leases are recorded, never expire.
``tests/integration/test_registry.py`` runs one table of cases against this fake and against
:class:`~meshserve.controlplane.registry.EtcdRegistry` on a real etcd, so the two cannot drift.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.common.routing.rollout import (
    DEFAULT_ALIAS,
    check_registration,
    first_live,
    version_of,
)
from meshserve.controlplane import keys
from meshserve.controlplane.registry import TXN_OPS, AliasPlan, SeqCounter, VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["FakeRegistry", "Stored"]


@dataclass(frozen=True, slots=True)
class Stored:
    value: bytes
    mod_revision: int
    lease: int = 0


class FakeRegistry:
    """:class:`~meshserve.controlplane.registry.Registry` on a dict (see the module doc)."""

    def __init__(self, *, leader: str = "") -> None:
        self.data: dict[str, Stored] = {}
        self.revision = 1
        self._wakes: dict[VariantKey, tuple[bytes, int]] = {}
        if leader:
            self._put(keys.LEADER, leader.encode())

    # -- the store --------------------------------------------------------------------------

    def _commit(
        self, puts: Mapping[str, bytes] | None = None, deletes: Iterable[str] = (), lease: int = 0
    ) -> int:
        """One write: every put and delete at one new revision (as one etcd transaction)."""
        self.revision += 1
        for key in deletes:
            self.data.pop(key, None)
        for key, value in (puts or {}).items():
            self.data[key] = Stored(value, self.revision, lease)
        return self.revision

    def _put(self, key: str, value: bytes, lease: int = 0) -> int:
        return self._commit({key: value}, lease=lease)

    def _delete(self, key: str) -> bool:
        if key not in self.data:
            return False
        self._commit(deletes=[key])
        return True

    def _under(self, prefix: str) -> list[str]:
        return sorted(k for k in self.data if k.startswith(prefix))

    def value(self, key: str) -> bytes | None:
        stored = self.data.get(key)
        return None if stored is None else stored.value

    # -- models, versions and aliases --------------------------------------------------------

    def _specs(self, model: str) -> list[mesh_pb2.ModelSpec]:
        return [
            keys.decode(self.data[k].value, mesh_pb2.ModelSpec())
            for k in self._under(keys.model_prefix(model))
        ]

    async def register_model(self, spec: mesh_pb2.ModelSpec) -> bool:
        for name in sorted({spec.variant, version_of(spec)}):
            if keys.alias_key(spec.name, name) in self.data:
                raise InvalidArgument(
                    f"{name!r} is an alias of model {spec.name!r}; give the version or variant "
                    "another name"
                )
        others = [s for s in self._specs(spec.name) if s.variant != spec.variant]
        check_registration(spec, self._specs(spec.name))
        key = keys.model_key(spec.name, spec.variant)
        created = key not in self.data
        puts = {key: keys.encode(spec)}
        live = keys.alias_key(spec.name, DEFAULT_ALIAS)
        if live not in self.data:
            puts[live] = keys.encode(first_live(spec, others, int(time.time() * 1000)))
        self._commit(puts)
        return created

    async def set_drift_profile(
        self, model: str, variant: str, profile: mesh_pb2.DriftProfile
    ) -> None:
        key = keys.model_key(model, variant)
        stored = self.data.get(key)
        if stored is None:
            raise NotFound(f"model {model!r} has no variant {variant!r}")
        spec = keys.decode(stored.value, mesh_pb2.ModelSpec())
        spec.drift_reference.CopyFrom(profile)
        self._put(key, keys.encode(spec))

    async def remove_variant(self, model: str, variant: str) -> int:
        specs = {s.variant: s for s in self._specs(model)}
        doomed = specs.get(variant)
        if doomed is None:
            return 0
        if len(specs) == 1:
            return await self.remove_model(model)
        version = version_of(doomed)
        if not any(version_of(s) == version for v, s in specs.items() if v != variant):
            for alias in await self.aliases(model):
                if version in (alias.version, alias.canary_version):
                    raise FailedPrecondition(
                        f"{variant!r} is the last variant of version {version!r} of alias "
                        f"{alias.alias!r} of model {model!r}"
                    )
        return int(self._delete(keys.model_key(model, variant)))

    async def remove_model(self, model: str) -> int:
        removed = self._under(keys.model_prefix(model))
        doomed = removed + self._under(keys.alias_prefix(model))
        if doomed:
            self._commit(deletes=doomed)
        return len(removed)

    async def aliases(self, model: str) -> list[mesh_pb2.Alias]:
        return [
            keys.decode(self.data[k].value, mesh_pb2.Alias())
            for k in self._under(keys.alias_prefix(model))
        ]

    async def change_alias(
        self, model: str, alias: str, plan: AliasPlan
    ) -> tuple[mesh_pb2.Alias, mesh_pb2.Alias | None]:
        registered = sorted({version_of(s) for s in self._specs(model)})
        if not registered:
            raise NotFound(f"unknown model {model!r}")
        stored = self.data.get(keys.alias_key(model, alias))
        current = None if stored is None else keys.decode(stored.value, mesh_pb2.Alias())
        new = plan(current, registered)
        if new is not current:
            self._put(keys.alias_key(model, alias), keys.encode(new))
        return new, current

    # -- policy, drain and wake marks -------------------------------------------------------

    async def apply_policy(self, text: str) -> int:
        return self._put(keys.POLICY, text.encode())

    async def policy(self) -> tuple[str, int] | None:
        stored = self.data.get(keys.POLICY)
        return None if stored is None else (stored.value.decode(), stored.mod_revision)

    async def confirm_unloads(self) -> bytes:
        stored = self.data.get(keys.UNLOAD_CONFIRM)
        count = keys.unload_confirmations(None if stored is None else stored.value)
        value = keys.unload_confirmation(count + 1, time.time_ns())
        self._put(keys.UNLOAD_CONFIRM, value)
        return value

    async def label_node(
        self, node_id: str, set_labels: Mapping[str, str], remove: Sequence[str]
    ) -> dict[str, str]:
        stored = self.value(keys.node_labels_key(node_id))
        labels = {} if stored is None else dict(keys.decode(stored, mesh_pb2.NodeLabels()).labels)
        labels.update(set_labels)
        for name in remove:
            labels.pop(name, None)
        if labels:
            value = keys.encode(mesh_pb2.NodeLabels(labels=labels))
            self._put(keys.node_labels_key(node_id), value)
        else:
            self._delete(keys.node_labels_key(node_id))
        return labels

    async def drain(self, node_id: str) -> None:
        self._put(keys.draining_key(node_id), b"")

    async def undrain(self, node_id: str) -> None:
        self._delete(keys.draining_key(node_id))

    async def mark_shutdown_drain(self, node_id: str, lease: int) -> bool:
        if keys.draining_key(node_id) in self.data:
            return False
        self._put(keys.draining_key(node_id), keys.SHUTDOWN_DRAIN, lease)
        return True

    async def clear_shutdown_drain(self, node_id: str) -> bool:
        if self.value(keys.draining_key(node_id)) != keys.SHUTDOWN_DRAIN:
            return False
        return self._delete(keys.draining_key(node_id))

    async def wake(self, key: VariantKey, lease: int) -> None:
        value, holders = self._wakes.get(key, (str(time.time_ns() // 1_000_000).encode(), 0))
        self._wakes[key] = (value, holders + 1)
        self._put(keys.wake_key(*key), value, lease)

    async def unwake(self, key: VariantKey) -> None:
        value, holders = self._wakes.get(key, (b"", 0))
        if holders > 1:
            self._wakes[key] = (value, holders - 1)
        elif self._wakes.pop(key, None) is not None and self.value(keys.wake_key(*key)) == value:
            self._delete(keys.wake_key(*key))

    # -- replicas, node link records, placements ------------------------------------------

    async def register_replica(self, info: mesh_pb2.ReplicaInfo, lease: int) -> None:
        self._put(keys.replica_key(info.replica_id), keys.encode(info), lease)

    async def put_node_records(
        self, replica_id: str, infos: Sequence[mesh_pb2.NodeInfo], lease: int
    ) -> None:
        for first in range(0, len(infos), TXN_OPS):  # one revision per transaction
            chunk = infos[first : first + TXN_OPS]
            puts = {keys.node_link_key(i.node_id, replica_id): keys.encode(i) for i in chunk}
            self._commit(puts, lease=lease)

    async def delete_node_records(self, replica_id: str, node_ids: Sequence[str]) -> None:
        for first in range(0, len(node_ids), TXN_OPS):  # one revision per transaction
            chunk = node_ids[first : first + TXN_OPS]
            self._commit(deletes=[keys.node_link_key(n, replica_id) for n in chunk])

    async def delete_node_record(
        self, node_id: str, replica_id: str, *, mod_revision: int | None = None
    ) -> bool:
        key = keys.node_link_key(node_id, replica_id)
        stored = self.data.get(key)
        if stored is None or (mod_revision is not None and stored.mod_revision != mod_revision):
            return False
        return self._delete(key)

    async def write_placements(
        self,
        upserts: Mapping[VariantKey, mesh_pb2.Placement],
        deletes: Iterable[VariantKey],
        leader: str,
    ) -> bool:
        if self.value(keys.LEADER) != leader.encode():
            return False
        puts = {keys.placement_key(*k): keys.encode(p) for k, p in upserts.items()}
        self._commit(puts, [keys.placement_key(*k) for k in deletes])
        return True

    # -- alarm episodes --------------------------------------------------------------------

    async def open_alarm(
        self, kind: str, model: str, variant: str, value: bytes, leader: str
    ) -> int:
        key = keys.alarm_key(kind, model, variant)
        if self.value(keys.LEADER) != leader.encode() or key in self.data:
            return 0
        return self._put(key, value)

    async def close_alarm(self, kind: str, model: str, variant: str, leader: str) -> int:
        key = keys.alarm_key(kind, model, variant)
        if self.value(keys.LEADER) != leader.encode() or key not in self.data:
            return 0
        return self._commit(deletes=[key])

    async def keep_captured_reference(
        self, model: str, variant: str, profile: mesh_pb2.DriftProfile
    ) -> bool:
        stored = self.data.get(keys.model_key(model, variant))
        if stored is None:
            return False
        spec = keys.decode(stored.value, mesh_pb2.ModelSpec())
        if spec.drift_reference.output.counts or spec.drift_reference.features:
            return False
        spec.drift_reference.CopyFrom(profile)
        self._put(keys.model_key(model, variant), keys.encode(spec))
        return True

    # -- the event ring --------------------------------------------------------------------

    async def append_events(
        self, batch: Sequence[mesh_pb2.Event], counter: SeqCounter, capacity: int
    ) -> tuple[bool, SeqCounter]:
        stored = self.data.get(keys.EVENTS_SEQ)
        if (0 if stored is None else stored.mod_revision) != counter.revision:
            if stored is None:
                return False, SeqCounter()
            return False, SeqCounter(int(stored.value.decode() or "0"), stored.mod_revision)
        last = counter.last + len(batch)
        puts = {keys.EVENTS_SEQ: str(last).encode()}
        for offset, event in enumerate(batch):
            event.seq = counter.last + 1 + offset
            puts[keys.event_key(event.seq)] = keys.encode(event)
        oldest_kept = keys.event_key(last - capacity + 1)
        trimmed = [k for k in self._under(keys.EVENTS) if k < oldest_kept]
        return True, SeqCounter(last, self._commit(puts, trimmed))

    async def has_event(self, event: mesh_pb2.Event) -> bool:
        return self.value(keys.event_key(event.seq)) == keys.encode(event)

    async def read_events(self) -> list[bytes]:
        return [self.data[k].value for k in reversed(self._under(keys.EVENTS))]
