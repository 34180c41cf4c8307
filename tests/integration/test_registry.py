"""The registry's contract, one table of cases run twice: on :class:`EtcdRegistry` against a
real etcd, and on the in-memory :class:`FakeRegistry` that unit tests use, so the fake cannot
drift from what it stands for. (The races themselves: test_registry_races.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.common.routing.rollout import plan_rollout
from meshserve.controlplane import keys
from meshserve.controlplane.etcd import Session, connect
from meshserve.controlplane.etcd._client import get, get_prefix
from meshserve.controlplane.registry import TXN_OPS, EtcdRegistry, Registry, SeqCounter
from meshserve.protos import mesh_pb2
from tests.support.fake_registry import FakeRegistry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

SHA = "cd" * 32


class Store:
    """A registry under test and a way to read back what it stored (etcd or the dict)."""

    def __init__(self, registry: Registry, client: Any = None) -> None:
        self.registry = registry
        self._client = client

    async def value(self, key: str) -> bytes | None:
        if self._client is None:
            assert isinstance(self.registry, FakeRegistry)
            return self.registry.value(key)
        kv = await get(self._client, key.encode())
        return None if kv is None else kv.value

    async def keys_under(self, prefix: str) -> list[str]:
        if self._client is None:
            assert isinstance(self.registry, FakeRegistry)
            return sorted(k for k in self.registry.data if k.startswith(prefix))
        _, kvs = await get_prefix(self._client, prefix.encode())
        return sorted(kv.key.decode() for kv in kvs)

    async def mod_revision(self, key: str) -> int:
        if self._client is None:
            assert isinstance(self.registry, FakeRegistry)
            return self.registry.data[key].mod_revision
        kv = await get(self._client, key.encode())
        assert kv is not None
        return kv.mod_revision

    async def lease(self) -> int:
        if self._client is None:
            return 7
        session = await Session.open(self._client, 30)
        return session.lease_id

    async def put(self, key: str, value: bytes) -> None:
        """A write from outside the registry (the election, another replica)."""
        if self._client is None:
            assert isinstance(self.registry, FakeRegistry)
            self.registry._commit({key: value})
            return
        await self._client.put(key.encode(), value)


@pytest.fixture(params=["etcd", "fake"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "fake":
        yield Store(FakeRegistry())
        return
    server = request.getfixturevalue("etcd")  # a fresh etcd for this test
    client = await connect(server.url)
    try:
        yield Store(EtcdRegistry(client), client)
    finally:
        await client.close()


def spec(
    model: str, variant: str, copies: int = 1, version: str | None = None
) -> mesh_pb2.ModelSpec:
    """Variant ``variant`` of version ``version`` (None: its own version, named after it; "":
    the implicit version)."""
    return mesh_pb2.ModelSpec(
        name=model,
        variant=variant,
        version=variant if version is None else version,
        artifact_uri=f"file:///{model}-{variant}.onnx",
        sha256=SHA,
        copies=copies,
    )


def to(version: str, alias: str = "live") -> Any:
    def plan(current: mesh_pb2.Alias | None, registered: list[str]) -> mesh_pb2.Alias:
        return plan_rollout(
            current,
            model="m",
            alias=alias,
            version=version,
            canary_percent=0,
            registered=registered,
            serving_now="",
            now_ms=1,
        )

    return plan


async def test_register_reports_created_and_replaces_the_spec(store: Store) -> None:
    r = store.registry
    assert await r.register_model(spec("m", "v1")) is True
    assert await r.register_model(spec("m", "v1", copies=3)) is False
    stored = await store.value(keys.model_key("m", "v1"))
    assert stored is not None and keys.decode(stored, mesh_pb2.ModelSpec()).copies == 3


async def aliases(store: Store, model: str = "m") -> dict[str, tuple[str, str]]:
    return {a.alias: (a.version, a.previous_version) for a in await store.registry.aliases(model)}


async def test_the_first_version_registered_becomes_live_and_later_ones_do_not(
    store: Store,
) -> None:
    r = store.registry
    assert await r.register_model(spec("m", "v1")) is True
    assert await aliases(store) == {"live": ("v1", "")}
    assert await r.register_model(spec("m", "v1-int8", version="v1")) is True
    assert await r.register_model(spec("m", "v2")) is True
    assert await r.register_model(spec("m", "v2", copies=2)) is False, "an update, not new"
    assert await aliases(store) == {"live": ("v1", "")}, "v2 waits for a rollout"
    new, old = await r.change_alias("m", "live", to("v2"))
    assert old is not None and (new.version, new.previous_version) == ("v2", "v1")
    # an unversioned model has one implicit version, live too
    assert await r.register_model(spec("u", "fast", version="")) is True
    assert await r.register_model(spec("u", "accurate", version="")) is True
    assert await aliases(store, "u") == {"live": ("default", "")}


async def test_version_and_variant_names_never_clash(store: Store) -> None:
    r = store.registry
    await r.register_model(spec("m", "v1"))
    await r.register_model(spec("m", "int8", version="v1"))
    with pytest.raises(InvalidArgument, match="belongs to version 'v1'"):
        await r.register_model(spec("m", "int8", version="v2"))
    with pytest.raises(InvalidArgument, match="is a variant of version 'v1'"):
        await r.register_model(spec("m", "x", version="int8"))
    assert await store.keys_under(keys.model_prefix("m")) == [
        keys.model_key("m", "int8"),
        keys.model_key("m", "v1"),
    ]


async def test_a_version_cannot_take_an_alias_name(store: Store) -> None:
    r = store.registry
    await r.register_model(spec("m", "v1"))
    new, old = await r.change_alias("m", "live", to("v1"))
    assert new is old and new.version == "v1", "live already points at the first version"
    with pytest.raises(InvalidArgument, match="alias"):
        await r.register_model(spec("m", "live"))
    with pytest.raises(InvalidArgument, match="alias"):
        await r.register_model(spec("m", "x", version="live"))
    assert await store.keys_under(keys.model_prefix("m")) == [keys.model_key("m", "v1")]


async def test_alias_of_an_unknown_model_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="unknown model"):
        await store.registry.change_alias("m", "live", to("v1"))
    assert await store.keys_under(keys.ALIASES) == []


async def test_unchanged_alias_plan_writes_nothing(store: Store) -> None:
    r = store.registry
    await r.register_model(spec("m", "v1"))
    await r.change_alias("m", "live", to("v1"))
    before = await store.mod_revision(keys.alias_key("m", "live"))
    new, old = await r.change_alias("m", "live", to("v1"))
    assert new is old
    assert await store.mod_revision(keys.alias_key("m", "live")) == before


async def test_remove_variant_refused_while_an_alias_points_at_it(store: Store) -> None:
    r = store.registry
    await r.register_model(spec("m", "v1"))
    await r.register_model(spec("m", "v2"))
    await r.change_alias("m", "live", to("v1"))
    with pytest.raises(FailedPrecondition, match="live"):
        await r.remove_variant("m", "v1")
    assert await r.remove_variant("m", "v2") == 1
    assert await r.remove_variant("m", "v2") == 0
    assert await store.keys_under(keys.model_prefix("m")) == [keys.model_key("m", "v1")]
    # one of several variants of the live version may go; the last variant takes the model
    await r.register_model(spec("m", "v1-int8", version="v1"))
    assert await r.remove_variant("m", "v1-int8") == 1
    assert await r.remove_variant("m", "v1") == 1
    assert await store.keys_under(keys.model_prefix("m")) == []
    assert await store.keys_under(keys.alias_prefix("m")) == []


async def test_remove_model_takes_versions_and_aliases_and_nothing_else(store: Store) -> None:
    r = store.registry
    for model, variant in (("m", "v1"), ("m", "v2"), ("mm", "v1")):
        await r.register_model(spec(model, variant))
    await r.change_alias("m", "live", to("v1"))
    assert await r.remove_model("m") == 2
    assert await store.keys_under(keys.model_prefix("m")) == []
    assert await store.keys_under(keys.alias_prefix("m")) == []
    assert await store.keys_under(keys.model_prefix("mm")) == [keys.model_key("mm", "v1")]
    assert await r.remove_model("m") == 0


async def test_drift_profile_keeps_every_other_field(store: Store) -> None:
    r = store.registry
    await r.register_model(spec("m", "v1", copies=4))
    profile = mesh_pb2.DriftProfile(rows=9, source="test")
    await r.set_drift_profile("m", "v1", profile)
    stored = await store.value(keys.model_key("m", "v1"))
    assert stored is not None
    got = keys.decode(stored, mesh_pb2.ModelSpec())
    assert got.copies == 4 and got.drift_reference == profile
    with pytest.raises(NotFound):
        await r.set_drift_profile("m", "nope", profile)


async def test_policy_round_trip(store: Store) -> None:
    r = store.registry
    assert await r.policy() is None
    revision = await r.apply_policy("name: p\n")
    assert await r.policy() == ("name: p\n", revision)


async def test_a_shutdown_mark_never_replaces_an_operator_drain(store: Store) -> None:
    r = store.registry
    lease = await store.lease()
    key = keys.draining_key("n1")
    await r.drain("n1")
    assert await r.mark_shutdown_drain("n1", lease) is False
    assert await store.value(key) == b""
    assert await r.clear_shutdown_drain("n1") is False  # the operator's mark stays
    assert await store.value(key) == b""
    await r.undrain("n1")
    assert await store.value(key) is None
    assert await r.mark_shutdown_drain("n1", lease) is True
    assert await store.value(key) == keys.SHUTDOWN_DRAIN
    assert await r.clear_shutdown_drain("n1") is True
    assert await store.value(key) is None


async def test_wake_mark_lasts_until_the_last_waiter_and_spares_a_foreign_one(
    store: Store,
) -> None:
    r = store.registry
    lease = await store.lease()
    key = keys.wake_key("m", "v1")
    await r.wake(("m", "v1"), lease)
    first = await store.value(key)
    await asyncio.sleep(0.005)  # a later millisecond: the held mark keeps its value
    await r.wake(("m", "v1"), lease)
    assert await store.value(key) == first, "one value per variant while any waiter holds it"
    await r.unwake(("m", "v1"))
    assert await store.value(key) is not None, "a second waiter still waits"
    await r.unwake(("m", "v1"))
    assert await store.value(key) is None
    await r.unwake(("m", "v1"))  # more ends than starts: nothing to do
    # another replica's mark written over ours is not ours to delete
    await r.wake(("m", "v1"), lease)
    await store.put(key, b"other")
    await r.unwake(("m", "v1"))
    assert await store.value(key) == b"other"


async def test_a_sweep_spares_a_record_rewritten_since(store: Store) -> None:
    r = store.registry
    lease = await store.lease()
    info = mesh_pb2.NodeInfo(node_id="n1", replicas=["cp-1"])
    key = keys.node_link_key("n1", "cp-1")
    await r.put_node_records("cp-1", [info], lease)
    seen = await store.mod_revision(key)
    await r.put_node_records("cp-1", [info], lease)  # a new stream wrote it again
    assert await r.delete_node_record("n1", "cp-1", mod_revision=seen) is False
    assert await store.value(key) is not None
    now = await store.mod_revision(key)
    assert await r.delete_node_record("n1", "cp-1", mod_revision=now) is True
    await r.put_node_records("cp-1", [info], lease)
    assert await r.delete_node_record("n1", "cp-1") is True
    assert await r.delete_node_record("n1", "cp-1") is False


async def test_placements_are_written_only_by_the_leader(store: Store) -> None:
    r = store.registry
    await store.put(keys.LEADER, b"cp-1")
    placement = mesh_pb2.Placement(model="m", variant="v1", nodes=["n1"])
    upserts = {("m", f"v{i}"): placement for i in range(150)}  # two transactions
    assert await r.write_placements(upserts, [], "cp-2") is False
    assert await store.keys_under(keys.PLACEMENTS) == []
    assert await r.write_placements(upserts, [], "cp-1") is True
    assert len(await store.keys_under(keys.PLACEMENTS)) == 150
    assert await r.write_placements({}, [("m", "v0")], "cp-1") is True
    assert len(await store.keys_under(keys.PLACEMENTS)) == 149


async def test_event_append_numbers_trims_and_refuses_a_stale_counter(store: Store) -> None:
    r = store.registry
    events = [mesh_pb2.Event(kind="k", message=str(i)) for i in range(5)]
    ok, counter = await r.append_events(events[:3], SeqCounter(), capacity=3)
    assert ok and counter.last == 3 and [e.seq for e in events[:3]] == [1, 2, 3]
    ok, counter = await r.append_events(events[3:], counter, capacity=3)
    assert ok and counter.last == 5 and [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert await store.keys_under(keys.EVENTS) == [keys.event_key(s) for s in (3, 4, 5)]
    assert await r.has_event(events[4]) and not await r.has_event(events[0])
    late = [mesh_pb2.Event(kind="k", message="late")]
    ok, seen = await r.append_events(late, SeqCounter(), capacity=3)  # stale guess
    assert not ok and seen == counter
    ok, counter = await r.append_events(late, seen, capacity=3)
    assert ok and late[0].seq == 6
    stored = [keys.decode(v, mesh_pb2.Event()).message for v in await r.read_events()]
    assert stored == ["late", "4", "3"]


async def test_unload_confirmations_count_up_without_losing_one(store: Store) -> None:
    """``meshctl nodes confirm-unloads``: a compare-and-swap increment, every value new."""
    r = store.registry
    first = await r.confirm_unloads()
    assert keys.unload_confirmations(first) == 1
    racing = await asyncio.gather(*(r.confirm_unloads() for _ in range(4)))
    assert sorted(keys.unload_confirmations(v) for v in racing) == [2, 3, 4, 5]
    assert len({first, *racing}) == 5
    assert keys.unload_confirmations(await store.value(keys.UNLOAD_CONFIRM)) == 5


async def test_node_records_are_written_in_transactions_under_the_lease(store: Store) -> None:
    r = store.registry
    lease = await store.lease()
    infos = [mesh_pb2.NodeInfo(node_id=f"n{i}", replicas=["cp-1"]) for i in range(TXN_OPS + 20)]
    await r.put_node_records("cp-1", infos, lease)
    first = await store.mod_revision(keys.node_link_key("n0", "cp-1"))
    assert await store.mod_revision(keys.node_link_key(f"n{TXN_OPS - 1}", "cp-1")) == first
    assert await store.mod_revision(keys.node_link_key(f"n{TXN_OPS}", "cp-1")) == first + 1
    assert await store.value(keys.node_link_key(f"n{TXN_OPS + 19}", "cp-1")) is not None
