"""Commands carry the placement revision they were decided on: a replica whose view lags
cannot undo a newer decision (hub side: what is sent; node side: what is applied)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import numpy as np
import pytest

from meshserve.common.errors import Unavailable
from meshserve.controlplane.link.handshake import TokenBucket
from meshserve.controlplane.link.hub import Hub
from meshserve.controlplane.link.session import NodeSession
from meshserve.controlplane.snapshot import Snapshot
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.node.copies import CopyEntry, CopyManager
from meshserve.node.store import ModelStore
from meshserve.protos import mesh_pb2
from tests.support.fake_registry import FakeRegistry
from tests.support.inproc import eventually

KEY = ("mlp", "default")
SHA = "ab" * 32


def _snapshot(nodes: list[str] | None, revision: int, view: int) -> Snapshot:
    spec = mesh_pb2.ModelSpec(name="mlp", variant="default", artifact_uri="file:///m", sha256=SHA)
    placements = {} if nodes is None else {KEY: mesh_pb2.Placement(nodes=nodes)}
    revisions = {} if nodes is None else {KEY: revision}
    return Snapshot({KEY: spec}, placements, {}, revisions, view)


def _hub() -> Hub:
    return Hub(
        registry=FakeRegistry(),
        replica_id="cp-1",
        lease_ttl_s=3,
        lease_id=lambda: 1,
        snapshot=lambda: Snapshot(),
        replicas=lambda: [],
    )


def _drain(session: NodeSession) -> list[mesh_pb2.ControlMessage]:
    out = []
    while not session.outbox.empty():
        out.append(session.outbox.get_nowait())
    return out


def _status(state: int) -> mesh_pb2.NodeMessage:
    return mesh_pb2.NodeMessage(
        copy_status=mesh_pb2.CopyStatus(model="mlp", variant="default", sha256=SHA, state=state)
    )


def test_load_carries_placement_revision_and_is_resent_after_the_node_drops_it() -> None:
    async def scenario() -> None:
        hub = _hub()
        session = NodeSession(mesh_pb2.Hello(node_id="n1"), "cp-1", 16)
        snap = _snapshot(["n1"], revision=7, view=9)
        hub._snapshot = lambda: snap  # type: ignore[method-assign]
        hub.sessions["n1"] = session
        hub.reconcile_session(session, snap)
        [sent] = _drain(session)
        assert sent.load.sha256 == SHA and sent.load.placement_revision == 7
        hub.reconcile_session(session, snap)
        assert _drain(session) == [], "the same decision is not sent twice"
        hub._on_message(session, _status(mesh_pb2.LOADING))
        await asyncio.sleep(0)  # the reconcile a report schedules
        assert _drain(session) == [], "a copy being loaded is not told again"
        hub._on_message(session, _status(mesh_pb2.UNLOADED))  # e.g. a stale unload got through
        await asyncio.sleep(0)
        [again] = _drain(session)
        assert again.WhichOneof("body") == "load" and again.load.placement_revision == 7

    asyncio.run(scenario())


def test_unload_only_when_the_placement_excludes_the_node_or_is_gone() -> None:
    hub = _hub()
    hello = mesh_pb2.Hello(
        node_id="n1",
        copies=[
            mesh_pb2.CopyStatus(model="mlp", variant="default", sha256=SHA, state=mesh_pb2.READY)
        ],
    )
    session = NodeSession(hello, "cp-1", 16)
    session.adopt(_snapshot(["n1"], revision=7, view=9))  # registered with that sha256
    hub.reconcile_session(session, _snapshot(["n1"], revision=7, view=9))
    assert _drain(session) == []
    hub.reconcile_session(session, _snapshot(["n2"], revision=11, view=12))
    [sent] = _drain(session)
    assert sent.unload.model == "mlp" and sent.unload.placement_revision == 11
    session.sent.clear()
    hub.reconcile_session(session, _snapshot(None, revision=0, view=15))
    [sent] = _drain(session)
    assert sent.unload.placement_revision == 15, "no placement: the view's revision"


def test_node_ignores_a_command_older_than_the_last_it_applied(tmp_path: Path) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")

    async def scenario() -> None:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            copies = CopyManager(ModelStore(tmp_path / "store"), pool)
            load = mesh_pb2.LoadModel(
                model="mlp",
                variant="default",
                artifact_uri=model.as_uri(),
                sha256=sha256_file(model),
                placement_revision=8,
            )
            copies.load(load)
            await copies.unload("mlp", "default", placement_revision=5)  # decided on an older view
            assert [s.model for s in copies.statuses()] == ["mlp"]
            await eventually(lambda: copies.statuses()[0].state == mesh_pb2.READY, 10)
            await copies.unload("mlp", "default", placement_revision=9)
            assert copies.statuses() == []
            copies.load(load)  # decided at 8, before the unload at 9
            assert copies.statuses() == [], "a load older than the unload is ignored"

    asyncio.run(scenario())


def test_a_replaced_copy_releases_its_batcher_and_its_artifact(tmp_path: Path) -> None:
    first, second = make_mlp(tmp_path / "a.onnx"), make_mlp(tmp_path / "b.onnx", seed=1)
    batching = mesh_pb2.ServingConfig(batching=mesh_pb2.BatchingConfig(enabled=True))

    def load(path: Path, revision: int) -> mesh_pb2.LoadModel:
        return mesh_pb2.LoadModel(
            model="mlp",
            variant="default",
            artifact_uri=path.as_uri(),
            sha256=sha256_file(path),
            serving=batching,
            placement_revision=revision,
        )

    async def ready(copies: CopyManager, sha: str) -> CopyEntry:
        def found() -> CopyEntry | None:
            [entry] = copies.entries()
            return entry if entry.sha256 == sha and entry.state == mesh_pb2.READY else None

        entry: CopyEntry = await eventually(found, 10, what=f"a READY copy of {sha}")
        return entry

    async def scenario() -> None:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            store = ModelStore(tmp_path / "store")
            copies = CopyManager(store, pool)
            copies.load(load(first, 1))
            old = await ready(copies, sha256_file(first))
            assert old.batcher is not None
            batcher = old.batcher
            copies.load(load(second, 2))  # a new artifact for the same variant
            await ready(copies, sha256_file(second))
            await eventually(lambda: old.batcher is None, 5, what="the old batcher closed")
            pinned = {e.sha256: e.pinned for e in store.entries()}
            assert pinned == {sha256_file(first): False, sha256_file(second): True}
            assert old.batcher is None and old.copy is None
            with pytest.raises(Unavailable, match="closed"):
                await batcher.submit({"x": np.zeros((1, 64), dtype=np.float32)})
            await copies.close()

    asyncio.run(scenario())


def test_new_streams_are_admitted_at_a_bounded_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=10, clock=lambda: now[0])
    assert sum(bucket.take() for _ in range(50)) == 10, "a storm gets the burst at once"
    now[0] += 0.5
    assert sum(bucket.take() for _ in range(50)) == 5, "then the rate"
    now[0] += 100
    assert sum(bucket.take() for _ in range(50)) == 10, "savings are capped at the burst"
