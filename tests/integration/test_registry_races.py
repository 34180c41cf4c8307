"""Racing Admin writes against a real etcd: neither write is lost, nothing partial remains.

A real etcd and a real control plane in this process (no nodes: specs name a node selector no
node has, so nothing is loaded); two writers call the Admin API over gRPC at the same moment,
round after round, the second one started a little later each round (a sweep of offsets from
0 to a few round trips) so that every interleaving of their etcd calls comes up. After each
round the stored state is read back from etcd (linearizable) and checked.

Each test names the race it proves closed. Each was run against the read-then-write code it
replaces (the Admin API of the commit before the registry seam, same test file): the drift
profile test lost the register's write in 8 to 10 of its 20 rounds, the three alias tests
failed in their first round.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from meshserve.controlplane import keys
from meshserve.controlplane.etcd._client import WatchEvent, get, get_prefix, watch
from meshserve.protos import mesh_pb2, mesh_pb2_grpc
from tests.support.etcd import EtcdServer
from tests.support.inproc import InProcMesh, eventually, inproc_mesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROUNDS = 20
SHA = "ab" * 32
NOWHERE = {"race": "nowhere"}  # no node carries this label: nothing is ever placed


@pytest.fixture
async def mesh(etcd: EtcdServer, tmp_path: Path) -> AsyncIterator[InProcMesh]:
    async with inproc_mesh(etcd.url, tmp_path, []) as m:
        yield m


@pytest.fixture
async def admin(mesh: InProcMesh) -> AsyncIterator[mesh_pb2_grpc.AdminStub]:
    async with aio.insecure_channel(mesh.address) as channel:
        yield mesh_pb2_grpc.AdminStub(channel)


def spec(model: str, variant: str, copies: int = 1) -> mesh_pb2.ModelSpec:
    """Version ``variant`` of ``model``, with one variant named after it."""
    return mesh_pb2.ModelSpec(
        name=model,
        variant=variant,
        version=variant,
        artifact_uri=f"file:///models/{model}-{variant}.onnx",
        sha256=SHA,
        copies=copies,
        node_selector=NOWHERE,
    )


PROFILE = mesh_pb2.DriftProfile(
    output=mesh_pb2.Sketch(name="y", edges=[0.0, 1.0], counts=[1, 2, 3]), rows=6, source="race"
)


def offset(round_: int) -> float:
    """The second writer's head start for round ``round_``: 0 to ~4 ms, then again."""
    return (round_ % 10) * 0.0004


async def race(
    first: Callable[[], Awaitable[Any]], second: Callable[[], Awaitable[Any]], delay: float
) -> tuple[Any, Any]:
    """Run both writers together (``second`` ``delay`` s later); each result is the reply or
    the gRPC status code it failed with (any other failure fails the test)."""
    barrier = asyncio.Event()

    async def run(call: Callable[[], Awaitable[Any]], wait: float) -> Any:
        await barrier.wait()
        if wait:
            await asyncio.sleep(wait)
        try:
            return await call()
        except aio.AioRpcError as exc:
            return exc.code()

    tasks = asyncio.gather(run(first, 0.0), run(second, delay))
    await asyncio.sleep(0)
    barrier.set()
    a, b = await tasks
    return a, b


async def stored_spec(client: Any, model: str, variant: str) -> mesh_pb2.ModelSpec | None:
    kv = await get(client, keys.model_key(model, variant).encode())
    return None if kv is None else keys.decode(kv.value, mesh_pb2.ModelSpec())


async def stored_alias(client: Any, model: str, alias: str) -> mesh_pb2.Alias | None:
    kv = await get(client, keys.alias_key(model, alias).encode())
    return None if kv is None else keys.decode(kv.value, mesh_pb2.Alias())


async def stored_keys(client: Any, prefix: str) -> list[str]:
    _, kvs = await get_prefix(client, prefix.encode())
    return [kv.key.decode() for kv in kvs]


async def registered(mesh: InProcMesh, model: str, variant: str) -> None:
    await eventually(lambda: (model, variant) in mesh.cp.snapshot().models, 10, what=variant)


async def test_set_drift_profile_never_undoes_a_concurrent_register(
    mesh: InProcMesh, admin: mesh_pb2_grpc.AdminStub, client: Any
) -> None:
    """SetDriftProfile racing RegisterModel of the same variant. Proves: the profile is set by
    a read-modify-write of the *stored* spec that commits only if the spec did not change since
    it was read (else it re-reads), so the register's new spec (copies=2) is never overwritten
    by a stale copy (copies=1) carrying the profile. The read-then-write code edited the
    mirrored spec and put it back, undoing a register that landed in between."""
    for i in range(ROUNDS):
        variant = f"v{i}"
        await admin.RegisterModel(mesh_pb2.RegisterModelRequest(model=spec("m", variant)))
        await registered(mesh, "m", variant)
        new = spec("m", variant, copies=2)
        reply_a, reply_b = await race(
            partial(admin.RegisterModel, mesh_pb2.RegisterModelRequest(model=new)),
            partial(
                admin.SetDriftProfile,
                mesh_pb2.SetDriftProfileRequest(model="m", variant=variant, profile=PROFILE),
            ),
            offset(i),
        )
        assert isinstance(reply_a, mesh_pb2.RegisterModelResponse), reply_a
        assert isinstance(reply_b, mesh_pb2.SetDriftProfileResponse), reply_b
        stored = await stored_spec(client, "m", variant)
        assert stored is not None
        assert reply_a.model.copies == new.copies
        new = reply_a.model  # as the register wrote it (RegisterModel stamps registered_unix_ms)
        with_profile = mesh_pb2.ModelSpec()
        with_profile.CopyFrom(new)
        with_profile.drift_reference.CopyFrom(PROFILE)
        # The register landed after the profile (and replaced the spec, as a register does)
        # or before it (and the profile was added to the register's spec): either way the
        # register's write is there.
        assert stored in (new, with_profile), f"round {i}: register's write lost: {stored}"


async def test_register_and_rollout_never_both_take_one_name(
    mesh: InProcMesh, admin: mesh_pb2_grpc.AdminStub, client: Any
) -> None:
    """RegisterModel of version NAME racing a Rollout creating alias NAME of the same model.
    Proves: the register compares the alias key's absence and the alias write compares the
    version key's absence in the same transaction as the write, so exactly one wins and the
    other gets INVALID_ARGUMENT; never a model whose NAME is both a version and an alias. The
    read-then-write code checked each name in one call and wrote in another: both won."""
    await admin.RegisterModel(mesh_pb2.RegisterModelRequest(model=spec("m", "v1")))
    await registered(mesh, "m", "v1")
    for i in range(ROUNDS):
        name = f"n{i}"
        calls = {
            "register": partial(
                admin.RegisterModel, mesh_pb2.RegisterModelRequest(model=spec("m", name))
            ),
            "rollout": partial(
                admin.Rollout, mesh_pb2.RolloutRequest(model="m", alias=name, version="v1")
            ),
        }
        order = ["register", "rollout"] if i % 2 else ["rollout", "register"]
        replies = dict(
            zip(order, await race(calls[order[0]], calls[order[1]], offset(i // 2)), strict=True)
        )
        won = [k for k, r in replies.items() if not isinstance(r, grpc.StatusCode)]
        assert len(won) == 1, f"round {i}: {replies}"
        loser = next(r for k, r in replies.items() if k not in won)
        assert loser == grpc.StatusCode.INVALID_ARGUMENT, f"round {i}: {replies}"
        version = await stored_spec(client, "m", name)
        alias = await stored_alias(client, "m", name)
        if won == ["register"]:
            assert version is not None and alias is None, f"round {i}: {version} {alias}"
        else:
            assert alias is not None and alias.version == "v1", f"round {i}: {alias}"
            assert version is None, f"round {i}: {name} is a version and an alias"


async def test_remove_version_and_rollout_to_it_never_leave_a_dangling_alias(
    mesh: InProcMesh, admin: mesh_pb2_grpc.AdminStub, client: Any
) -> None:
    """RemoveModel of version V racing a Rollout of alias `live` to V. Proves: the removal
    compares that no alias changed since it checked that none points at V, and the alias write
    compares that V is still registered, each in the transaction of its write; so exactly one
    wins (the other: FAILED_PRECONDITION or NOT_FOUND) and `live` never points at a removed
    version. The read-then-write code checked in one call and wrote in another: both won and
    `live` pointed at nothing."""
    await admin.RegisterModel(mesh_pb2.RegisterModelRequest(model=spec("m", "v1")))
    await registered(mesh, "m", "v1")
    await admin.Rollout(mesh_pb2.RolloutRequest(model="m", alias="live", version="v1"))
    for i in range(ROUNDS):
        version = f"v2-{i}"
        await admin.RegisterModel(mesh_pb2.RegisterModelRequest(model=spec("m", version)))
        await registered(mesh, "m", version)
        remove, rollout = await race(
            partial(admin.RemoveModel, mesh_pb2.RemoveModelRequest(name="m", variant=version)),
            partial(
                admin.Rollout, mesh_pb2.RolloutRequest(model="m", alias="live", version=version)
            ),
            offset(i),
        )
        live = await stored_alias(client, "m", "live")
        assert live is not None
        stored = await stored_spec(client, "m", live.version)
        assert stored is not None, f"round {i}: live -> {live.version}, not registered"
        if isinstance(remove, mesh_pb2.RemoveModelResponse):
            assert remove.removed == 1 and rollout == grpc.StatusCode.NOT_FOUND, (remove, rollout)
            assert live.version == "v1"
        else:
            assert remove == grpc.StatusCode.FAILED_PRECONDITION, (remove, rollout)
            assert isinstance(rollout, mesh_pb2.RolloutResponse), rollout
            assert live.version == version and await stored_spec(client, "m", version)
            await admin.Rollout(mesh_pb2.RolloutRequest(model="m", alias="live", version="v1"))


async def test_remove_model_is_one_write_and_a_racing_rollout_leaves_nothing(
    mesh: InProcMesh, admin: mesh_pb2_grpc.AdminStub, client: Any
) -> None:
    """RemoveModel (the whole model) racing a Rollout of a new alias of that model. Proves:
    the model's versions and aliases go in one transaction (one revision: no reader ever sees
    the aliases of a model without its versions), and an alias write compares that its version
    is registered, so after the race nothing of the model remains (the rollout either landed
    first and went with the model, or got NOT_FOUND). The read-then-write code deleted the two
    prefixes in two writes, and an alias written in between or after survived its model."""
    start = (await get_prefix(client, keys.ROOT.encode()))[0] + 1
    stream = await watch(client, keys.ROOT.encode(), start_revision=start, prefix=True)
    seen: list[WatchEvent] = []

    async def follow() -> None:
        async for event in stream:
            seen.append(event)

    follower = asyncio.create_task(follow())
    try:
        for i in range(ROUNDS):
            model = f"m{i}"
            await admin.RegisterModel(mesh_pb2.RegisterModelRequest(model=spec(model, "v1")))
            await registered(mesh, model, "v1")
            await admin.Rollout(mesh_pb2.RolloutRequest(model=model, alias="live", version="v1"))
            remove, rollout = await race(
                partial(admin.RemoveModel, mesh_pb2.RemoveModelRequest(name=model)),
                partial(
                    admin.Rollout,
                    mesh_pb2.RolloutRequest(model=model, alias="stable", version="v1"),
                ),
                offset(i),
            )
            assert isinstance(remove, mesh_pb2.RemoveModelResponse), remove
            assert remove.removed == 1
            assert rollout == grpc.StatusCode.NOT_FOUND or isinstance(
                rollout, mesh_pb2.RolloutResponse
            ), rollout
            assert await stored_keys(client, f"{keys.MODELS}{model}/") == []
            left = await stored_keys(client, f"{keys.ALIASES}{model}/")
            assert left == [], f"round {i}: aliases outlived their model: {left}"
        end = (await get_prefix(client, keys.ROOT.encode()))[0]
        await eventually(lambda: seen and seen[-1].kv.mod_revision >= end, 10, what="the watch")
    finally:
        follower.cancel()
        await stream.cancel()
    for i in range(ROUNDS):
        model_keys = (f"{keys.MODELS}m{i}/".encode(), f"{keys.ALIASES}m{i}/".encode())
        revisions = {
            e.kv.mod_revision
            for e in seen
            if e.kind == "DELETE" and e.kv.key.startswith(model_keys)
        }
        assert len(revisions) == 1, f"model m{i} was removed in {len(revisions)} writes"
