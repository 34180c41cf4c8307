"""The registry on etcd: :class:`EtcdRegistry` implements :class:`~.contract.Registry` (the
contract, and the rules every write follows, are in :mod:`.contract`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from meshserve.common.routing.rollout import (
    DEFAULT_ALIAS,
    check_registration,
    first_live,
    version_of,
)
from meshserve.controlplane import keys
from meshserve.controlplane.etcd._client import (
    ClientError,
    EtcdClient,
    EtcdStatus,
    KeyValue,
    create_if_absent,
    delete_if,
    get,
    get_prefix,
)
from meshserve.controlplane.etcd._client import compact as etcd_compact
from meshserve.controlplane.etcd._client import status as etcd_status
from meshserve.controlplane.registry.contract import (
    CAS_ATTEMPTS,
    TXN_OPS,
    AliasPlan,
    SeqCounter,
    VariantKey,
)
from meshserve.protos import mesh_pb2

__all__ = ["EtcdRegistry"]


class EtcdRegistry:
    """:class:`Registry` on an etcd client (the caller owns and closes the client)."""

    def __init__(self, client: EtcdClient) -> None:
        self._etcd = client
        self._wakes: dict[VariantKey, tuple[bytes, int]] = {}  # value written, holders

    async def _txn(
        self, compare: list[Any], success: list[Any], failure: list[Any] | None = None
    ) -> tuple[bool, list[Any]]:
        ok, responses = await self._etcd.transaction(
            compare=compare, success=success, failure=failure or []
        )
        return bool(ok), list(responses)

    def _unchanged_since(self, prefix: str, revision: int) -> Any:
        """Compare: no key under ``prefix`` was written after ``revision`` (deletes aside)."""
        raw = prefix.encode()
        return self._etcd.transactions.mod(raw, keys.prefix_end(raw)) < revision + 1

    # -- models, versions and aliases --------------------------------------------------------

    async def register_model(self, spec: mesh_pb2.ModelSpec) -> bool:
        t = self._etcd.transactions
        key = keys.model_key(spec.name, spec.variant).encode()
        prefix = keys.model_prefix(spec.name)
        live = keys.alias_key(spec.name, DEFAULT_ALIAS).encode()
        names = sorted({spec.variant, version_of(spec)})
        for _ in range(CAS_ATTEMPTS):
            revision, kvs = await get_prefix(self._etcd, prefix.encode())
            existing = [keys.decode(kv.value, mesh_pb2.ModelSpec()) for kv in kvs]
            others = [s for s in existing if s.variant != spec.variant]
            check_registration(spec, existing)
            live_kv = await get(self._etcd, live)
            compare = [
                self._unchanged_since(prefix, revision),
                t.mod(live) == (live_kv.mod_revision if live_kv is not None else 0),
            ]
            compare += [t.create(keys.alias_key(spec.name, n).encode()) == 0 for n in names]
            success = [t.put(key, keys.encode(spec))]
            if live_kv is None:  # the model's first version takes the queries that name none
                first = first_live(spec, others, int(time.time() * 1000))
                success.append(t.put(live, keys.encode(first)))
            ok, _ = await self._txn(compare, success)
            if ok:
                return len(others) == len(existing)
            for name in names:
                if await get(self._etcd, keys.alias_key(spec.name, name).encode()) is not None:
                    raise InvalidArgument(
                        f"{name!r} is an alias of model {spec.name!r} (meshctl model aliases "
                        f"{spec.name}); give the version or variant another name"
                    )
        raise Unavailable(f"model {spec.name!r} is changing concurrently; retry")

    async def set_drift_profile(
        self, model: str, variant: str, profile: mesh_pb2.DriftProfile
    ) -> None:
        t = self._etcd.transactions
        key = keys.model_key(model, variant).encode()
        kv = await get(self._etcd, key)
        for _ in range(CAS_ATTEMPTS):
            if kv is None:
                raise NotFound(f"model {model!r} has no variant {variant!r}")
            spec = keys.decode(kv.value, mesh_pb2.ModelSpec())
            spec.drift_reference.CopyFrom(profile)
            ok, responses = await self._txn(
                [t.mod(key) == kv.mod_revision], [t.put(key, keys.encode(spec))], [t.get(key)]
            )
            if ok:
                return
            kv = _ranged(responses)
        raise Unavailable(f"model {model!r} variant {variant!r} is changing concurrently; retry")

    async def remove_variant(self, model: str, variant: str) -> int:
        t = self._etcd.transactions
        aliases, prefix = keys.alias_prefix(model), keys.model_prefix(model)
        for _ in range(CAS_ATTEMPTS):
            revision, kvs = await get_prefix(self._etcd, prefix.encode())
            decoded = (keys.decode(kv.value, mesh_pb2.ModelSpec()) for kv in kvs)
            specs = {s.variant: s for s in decoded}
            doomed = specs.get(variant)
            if doomed is None:
                return 0
            if len(specs) == 1:  # the model's last variant: the model goes, aliases too
                return await self.remove_model(model)
            version = version_of(doomed)
            last = not any(version_of(s) == version for v, s in specs.items() if v != variant)
            alias_revision, alias_kvs = await get_prefix(self._etcd, aliases.encode())
            for kv in alias_kvs if last else ():
                alias = keys.decode(kv.value, mesh_pb2.Alias())
                if version in (alias.version, alias.canary_version):
                    role = "canary" if version == alias.canary_version else "version"
                    raise FailedPrecondition(
                        f"{variant!r} is the last variant of version {version!r}, the {role} "
                        f"of alias {alias.alias!r} of model {model!r}; roll the alias to "
                        "another version (or roll back) before removing it"
                    )
            ok, responses = await self._txn(
                [
                    self._unchanged_since(aliases, alias_revision),
                    self._unchanged_since(prefix, revision),
                    t.version(keys.model_key(model, variant).encode()) > 0,
                ],
                [t.delete(keys.model_key(model, variant).encode())],
            )
            if ok:
                return int(responses[0].response_delete_range.deleted)
        raise Unavailable(f"the aliases of model {model!r} are changing concurrently; retry")

    async def remove_model(self, model: str) -> int:
        t = self._etcd.transactions
        ranges = [keys.model_prefix(model).encode(), keys.alias_prefix(model).encode()]
        _, responses = await self._txn([], [t.delete(r, keys.prefix_end(r)) for r in ranges])
        return int(responses[0].response_delete_range.deleted)

    async def aliases(self, model: str) -> list[mesh_pb2.Alias]:
        _, kvs = await get_prefix(self._etcd, keys.alias_prefix(model).encode())
        found = (keys.decode(kv.value, mesh_pb2.Alias()) for kv in kvs)
        return sorted(found, key=lambda a: a.alias)

    async def change_alias(
        self, model: str, alias: str, plan: AliasPlan
    ) -> tuple[mesh_pb2.Alias, mesh_pb2.Alias | None]:
        t = self._etcd.transactions
        key = keys.alias_key(model, alias).encode()
        for _ in range(CAS_ATTEMPTS):
            revision, kvs = await get_prefix(self._etcd, keys.model_prefix(model).encode())
            specs = [keys.decode(kv.value, mesh_pb2.ModelSpec()) for kv in kvs]
            registered = sorted({version_of(s) for s in specs})
            if not registered:
                raise NotFound(f"unknown model {model!r}")
            kv = await get(self._etcd, key)
            current = None if kv is None else keys.decode(kv.value, mesh_pb2.Alias())
            new = plan(current, registered)
            if new is current:
                return new, current
            compare = [
                t.mod(key) == (kv.mod_revision if kv is not None else 0),
                self._unchanged_since(keys.model_prefix(model), revision),
            ]
            for spec in specs:  # (deletes do not move the prefix's mod revision)
                if version_of(spec) in (new.version, new.canary_version):
                    compare.append(t.version(keys.model_key(model, spec.variant).encode()) > 0)
            ok, _ = await self._txn(compare, [t.put(key, keys.encode(new))])
            if ok:
                return new, current
        raise Unavailable(f"alias {alias!r} of model {model!r} is changing concurrently; retry")

    # -- policy, drain and wake marks ----------------------------------------------------------

    async def apply_policy(self, text: str) -> int:
        result = await self._etcd.put(keys.POLICY.encode(), text.encode())
        return int(result.header.revision)

    async def request_retry(self, model: str, variant: str, node_id: str) -> list[str]:
        t = self._etcd.transactions
        _, kvs = await get_prefix(self._etcd, keys.model_prefix(model).encode())
        touched: list[str] = []
        for kv in kvs:
            spec = keys.decode(kv.value, mesh_pb2.ModelSpec())
            if variant and spec.variant != variant:
                continue
            key = keys.model_key(model, spec.variant).encode()
            current: KeyValue | None = kv
            for _ in range(CAS_ATTEMPTS):
                if current is None:
                    break  # removed meanwhile: nothing to retry
                spec = keys.decode(current.value, mesh_pb2.ModelSpec())
                spec.retry_requests[node_id] = spec.retry_requests.get(node_id, 0) + 1
                ok, responses = await self._txn(
                    [t.mod(key) == current.mod_revision],
                    [t.put(key, keys.encode(spec))],
                    [t.get(key)],
                )
                if ok:
                    touched.append(spec.variant)
                    break
                current = _ranged(responses)
            else:
                raise Unavailable(
                    f"model {model!r} variant {spec.variant!r} is changing concurrently; retry"
                )
        if not touched:
            what = f"model {model!r}" + (f" variant {variant!r}" if variant else "")
            raise NotFound(f"{what} is not registered (meshctl models list)")
        return sorted(touched)

    async def policy(self) -> tuple[str, int] | None:
        kv = await get(self._etcd, keys.POLICY.encode())
        if kv is None:
            return None
        return kv.value.decode("utf-8", "replace"), kv.mod_revision

    async def label_node(
        self, node_id: str, set_labels: Mapping[str, str], remove: Sequence[str]
    ) -> dict[str, str]:
        t = self._etcd.transactions
        key = keys.node_labels_key(node_id).encode()
        kv = await get(self._etcd, key)
        for _ in range(CAS_ATTEMPTS):
            labels = {} if kv is None else dict(keys.decode(kv.value, mesh_pb2.NodeLabels()).labels)
            labels.update(set_labels)
            for name in remove:
                labels.pop(name, None)
            write = (
                t.put(key, keys.encode(mesh_pb2.NodeLabels(labels=labels)))
                if labels
                else t.delete(key)
            )
            mod = 0 if kv is None else kv.mod_revision
            ok, responses = await self._txn([t.mod(key) == mod], [write], [t.get(key)])
            if ok:
                return labels
            kv = _ranged(responses)
        raise Unavailable(f"the labels of node {node_id!r} are changing concurrently; retry")

    async def drain(self, node_id: str) -> None:
        await self._etcd.put(keys.draining_key(node_id).encode(), b"")

    async def undrain(self, node_id: str) -> None:
        await self._etcd.delete(keys.draining_key(node_id).encode())

    async def mark_shutdown_drain(self, node_id: str, lease: int) -> bool:
        key = keys.draining_key(node_id).encode()
        created, _, _ = await create_if_absent(self._etcd, key, keys.SHUTDOWN_DRAIN, lease)
        return created

    async def clear_shutdown_drain(self, node_id: str) -> bool:
        key = keys.draining_key(node_id).encode()
        return await delete_if(self._etcd, key, value=keys.SHUTDOWN_DRAIN)

    async def confirm_unloads(self) -> bytes:
        t = self._etcd.transactions
        key = keys.UNLOAD_CONFIRM.encode()
        for _ in range(CAS_ATTEMPTS):
            current = await get(self._etcd, key)
            seen = None if current is None else current.value
            value = keys.unload_confirmation(keys.unload_confirmations(seen) + 1, time.time_ns())
            mod = 0 if current is None else current.mod_revision
            ok, _ = await self._txn([t.mod(key) == mod], [t.put(key, value)])
            if ok:
                return value
        raise Unavailable("unload confirmation: too many concurrent writers; try again")

    async def wake(self, key: VariantKey, lease: int) -> None:
        # One value per variant while any waiter holds it, counted BEFORE the put: two wakes
        # whose replies came back out of order must not leave this registry remembering a value
        # that is not the stored one (the last unwake would then never delete the mark).
        value, holders = self._wakes.get(key, (str(time.time_ns() // 1_000_000).encode(), 0))
        self._wakes[key] = (value, holders + 1)
        try:
            await self._etcd.put(keys.wake_key(*key).encode(), value, lease=lease)
        except BaseException:
            self._release(key)
            raise

    async def unwake(self, key: VariantKey) -> None:
        value = self._release(key)
        if value is not None:
            await delete_if(self._etcd, keys.wake_key(*key).encode(), value=value)

    def _release(self, key: VariantKey) -> bytes | None:
        """One waiter fewer; the value to delete when it was the last, else None."""
        value, holders = self._wakes.get(key, (b"", 0))
        if holders > 1:
            self._wakes[key] = (value, holders - 1)
            return None
        return value if self._wakes.pop(key, None) is not None else None

    # -- replicas, node link records, placements ----------------------------------------------

    async def register_replica(self, info: mesh_pb2.ReplicaInfo, lease: int) -> None:
        key = keys.replica_key(info.replica_id).encode()
        await self._etcd.put(key, keys.encode(info), lease=lease)

    async def put_node_records(
        self, replica_id: str, infos: Sequence[mesh_pb2.NodeInfo], lease: int
    ) -> None:
        if len(infos) == 1:  # a stream's first record: a plain put
            key = keys.node_link_key(infos[0].node_id, replica_id).encode()
            await self._etcd.put(key, keys.encode(infos[0]), lease=lease)
            return
        t = self._etcd.transactions
        ops = [
            t.put(keys.node_link_key(i.node_id, replica_id).encode(), keys.encode(i), lease=lease)
            for i in infos
        ]
        for first in range(0, len(ops), TXN_OPS):
            await self._txn([], ops[first : first + TXN_OPS])

    async def delete_node_records(self, replica_id: str, node_ids: Sequence[str]) -> None:
        t = self._etcd.transactions
        ops = [t.delete(keys.node_link_key(n, replica_id).encode()) for n in node_ids]
        for first in range(0, len(ops), TXN_OPS):
            await self._txn([], ops[first : first + TXN_OPS])

    async def delete_node_record(
        self, node_id: str, replica_id: str, *, mod_revision: int | None = None
    ) -> bool:
        key = keys.node_link_key(node_id, replica_id).encode()
        if mod_revision is not None:
            return await delete_if(self._etcd, key, mod_revision=mod_revision)
        return await self._etcd.delete(key) is not None

    async def write_placements(
        self,
        upserts: Mapping[VariantKey, mesh_pb2.Placement],
        deletes: Iterable[VariantKey],
        leader: str,
    ) -> bool:
        t = self._etcd.transactions
        ops = [t.put(keys.placement_key(*k).encode(), keys.encode(p)) for k, p in upserts.items()]
        ops += [t.delete(keys.placement_key(*k).encode()) for k in deletes]
        guard = t.value(keys.LEADER.encode()) == leader.encode()
        for first in range(0, len(ops), TXN_OPS):
            ok, _ = await self._txn([guard], ops[first : first + TXN_OPS])
            if not ok:
                return False
        return True

    # -- alarm episodes ---------------------------------------------------------------------------

    async def open_alarm(
        self, kind: str, model: str, variant: str, value: bytes, leader: str
    ) -> int:
        t = self._etcd.transactions
        key = keys.alarm_key(kind, model, variant).encode()
        guard = t.value(keys.LEADER.encode()) == leader.encode()
        ok, responses = await self._txn([guard, t.create(key) == 0], [t.put(key, value)])
        return int(responses[0].response_put.header.revision) if ok else 0

    async def close_alarm(self, kind: str, model: str, variant: str, leader: str) -> int:
        t = self._etcd.transactions
        key = keys.alarm_key(kind, model, variant).encode()
        guard = t.value(keys.LEADER.encode()) == leader.encode()
        ok, responses = await self._txn([guard, t.create(key) > 0], [t.delete(key)])
        return int(responses[0].response_delete_range.header.revision) if ok else 0

    async def keep_captured_reference(
        self, model: str, variant: str, profile: mesh_pb2.DriftProfile
    ) -> bool:
        t = self._etcd.transactions
        key = keys.model_key(model, variant).encode()
        kv = await get(self._etcd, key)
        for _ in range(CAS_ATTEMPTS):
            if kv is None:
                return False
            spec = keys.decode(kv.value, mesh_pb2.ModelSpec())
            if spec.drift_reference.output.counts or spec.drift_reference.features:
                return False
            spec.drift_reference.CopyFrom(profile)
            ok, responses = await self._txn(
                [t.mod(key) == kv.mod_revision], [t.put(key, keys.encode(spec))], [t.get(key)]
            )
            if ok:
                return True
            kv = _ranged(responses)
        return False

    # -- the event ring ---------------------------------------------------------------------------

    async def append_events(
        self, batch: Sequence[mesh_pb2.Event], counter: SeqCounter, capacity: int
    ) -> tuple[bool, SeqCounter]:
        t = self._etcd.transactions
        seq_key = keys.EVENTS_SEQ.encode()
        last = counter.last + len(batch)
        ops: list[Any] = [t.put(seq_key, str(last).encode())]
        for offset, event in enumerate(batch):
            event.seq = counter.last + 1 + offset
            ops.append(t.put(keys.event_key(event.seq).encode(), keys.encode(event)))
        oldest_kept = last - capacity + 1
        if oldest_kept > 1:  # the batch's keys are all >= oldest_kept: no overlap
            ops.append(t.delete(keys.event_key(0).encode(), keys.event_key(oldest_kept).encode()))
        ok, responses = await self._txn([t.mod(seq_key) == counter.revision], ops, [t.get(seq_key)])
        if ok:
            return True, SeqCounter(last, int(responses[0].response_put.header.revision))
        stored = _ranged(responses)
        if stored is None:  # the counter does not exist (yet): start at 1
            return False, SeqCounter()
        return False, SeqCounter(int(stored.value.decode() or "0"), stored.mod_revision)

    async def has_event(self, event: mesh_pb2.Event) -> bool:
        kv = await get(self._etcd, keys.event_key(event.seq).encode())
        return kv is not None and kv.value == keys.encode(event)

    async def store_status(self) -> EtcdStatus:
        return await etcd_status(self._etcd)

    async def ensure_store_id(self, candidate: str) -> str:
        key = keys.STORE_ID.encode()
        created, _, existing = await create_if_absent(self._etcd, key, candidate.encode(), 0)
        if created or existing is None:
            return candidate
        return existing.value.decode("utf-8", "replace")

    async def compact(self, revision: int) -> bool:
        try:
            await etcd_compact(self._etcd, revision)
        except ClientError as exc:
            if "compacted" in str(exc):  # that revision (or a later one) is compacted already
                return False
            raise
        return True

    async def read_events(self) -> list[bytes]:
        # aetcd has no range limit (it drops RangeRequest.limit): the whole ring, newest first.
        result = await self._etcd.get_prefix(keys.EVENTS.encode(), sort_order="descend")
        return [bytes(raw.value) for raw in result.kvs]


def _ranged(responses: list[Any]) -> KeyValue | None:
    """The key a transaction's failure branch read with one ``get`` (None: absent)."""
    ranged: list[tuple[bytes, Any]] = list(responses[0]) if responses else []
    if not ranged:
        return None
    value, got = ranged[0]
    return KeyValue(
        key=bytes(got.key),
        value=bytes(value),
        create_revision=int(got.create_revision),
        mod_revision=int(got.mod_revision),
        version=int(got.version),
        lease=int(got.lease),
    )
