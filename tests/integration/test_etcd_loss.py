"""etcd loses its data, or grows (issue 14 §5): real etcd, a real replica and real nodes.

etcd is stopped, its data directory moved away, and it is started again on the same address,
empty. The replica must notice (its store's revision went backwards), raise an alarm event,
reload its view from scratch -- a model registered afterwards is seen and placed -- and must not
react to the suddenly empty view by unloading every copy (the safety floor holds the mass unload
back). Before the fix the replica kept its old view: the new registration returned OK and was
never placed.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meshserve.client._admin import AdminClient
from meshserve.controlplane import keys
from meshserve.controlplane.etcd import PrefixMirror, connect
from meshserve.controlplane.etcd._client import get
from meshserve.controlplane.etcd.guard import StoreGuard
from meshserve.controlplane.registry import EtcdRegistry
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.devtools.local import LocalMesh, wait_until
from meshserve.protos import mesh_pb2
from tests.support.etcd import EtcdServer
from tests.support.mesh import copy_states, register_file, wait_copies

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _ready(admin: AdminClient, model: str) -> int:
    return sum(s == mesh_pb2.READY for s in copy_states(admin, model).values())


def _bump_revision(url: str, writes: int) -> None:
    async def bump() -> None:
        client = await connect(url)
        try:
            for i in range(writes):
                await client.put(b"/scratch", str(i).encode())
        finally:
            await client.close()

    asyncio.run(bump())


def test_a_replaced_store_is_noticed_reloaded_and_no_copy_is_unloaded(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        for name in ("n1", "n2"):
            mesh.start_node(name, [cp.address])
        _bump_revision(mesh.etcd_url, 300)  # the old store's placement revisions run high
        with AdminClient(cp.address) as admin:
            wait_until(lambda: len(admin.list_nodes()) == 2, 20, what="two nodes linked")
            for name, seed in (("a", 1), ("b", 2)):
                register_file(admin, name, make_mlp(tmp_path / f"{name}.onnx", seed=seed), copies=2)
            for name in ("a", "b"):
                wait_copies(admin, name, 2, timeout=60)

            etcd = mesh.etcd
            etcd.stop()
            etcd.data_dir.rename(etcd.workdir / "data.lost")
            etcd.start()  # same address, empty store

            lost = wait_until(
                lambda: admin.list_events(kind="etcd_data_lost"), 30, what="an etcd_data_lost alarm"
            )
            assert "backwards" in lost[0].message, lost[0].message
            floor = wait_until(  # the early confirmation recorded an unload_floor event too
                lambda: [
                    e
                    for e in admin.list_events(kind="unload_floor")
                    if "the linked nodes hold" in e.message
                ],
                15,
                what="the unload floor's alarm",
            )
            assert "4 of the 4 copies" in floor[0].message, floor[0].message

            register_file(admin, "c", make_mlp(tmp_path / "c.onnx", seed=3), copies=1)
            wait_copies(admin, "c", 1, timeout=40)  # seen and placed on the new store

            time.sleep(3.0)  # a few reconcile passes: nothing may have been unloaded
            assert (_ready(admin, "a"), _ready(admin, "b")) == (2, 2), admin.list_nodes()

            # "a" registered again with a new artifact: the new store's placement revisions are
            # lower than the ones the nodes applied for "a", yet the nodes load it (store ids
            # differ); "b" is still lost, so its copies stay held.
            new_a = make_mlp(tmp_path / "a2.onnx", seed=11)
            register_file(admin, "a", new_a, copies=2)
            sha = sha256_file(new_a)
            wait_until(
                lambda: (
                    sum(
                        c.state == mesh_pb2.READY and c.sha256 == sha
                        for n in admin.list_nodes()
                        for c in n.copies
                        if c.model == "a"
                    )
                    == 2
                ),
                40,
                what="the new artifact of a READY on both nodes",
            )
            assert _ready(admin, "b") == 2, admin.list_nodes()
        unloads = [line for p in mesh.processes for line in p.tail(400).splitlines()]
        assert not [line for line in unloads if "unload a/" in line or "unload b/" in line]


def _wipe_models(url: str) -> None:
    """Every model gone in one write (what a store that lost its models looks like)."""

    async def wipe() -> None:
        client = await connect(url)
        try:
            await client.delete_prefix(keys.MODELS.encode())
        finally:
            await client.close()

    asyncio.run(wipe())


def _confirm_unloads(address: str) -> str:
    args = [sys.executable, "-m", "meshserve.client.cli", "nodes", "confirm-unloads"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.run(
        [*args, "--target", address], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_a_held_mass_unload_is_released_by_the_operators_confirmation(tmp_path: Path) -> None:
    """The floor holds the mass unload back until ``meshctl nodes confirm-unloads``: one written
    before the episode does not pre-confirm it; a new one releases it on every replica (cp-2
    through its watch) and the copies unload within seconds, long before the 600 s timer."""
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp1 = mesh.start_controlplane("cp-1")
        cp2 = mesh.start_controlplane("cp-2")
        for name in ("n1", "n2"):
            mesh.start_node(name, [cp1.address])
        with AdminClient(cp1.address) as admin:
            wait_until(
                lambda: [len(n.replicas) for n in admin.list_nodes()] == [2, 2],
                30,
                what="two nodes linked to both replicas",
            )
            for name, seed in (("a", 1), ("b", 2)):
                register_file(admin, name, make_mlp(tmp_path / f"{name}.onnx", seed=seed), copies=2)
            for name in ("a", "b"):
                wait_copies(admin, name, 2, timeout=60)
            early = _confirm_unloads(cp1.address)  # no episode yet: must not pre-confirm one
            assert "#1: nothing held on cp-1" in early, early

            _wipe_models(mesh.etcd_url)
            floor = wait_until(  # the early confirmation recorded an unload_floor event too
                lambda: [
                    e
                    for e in admin.list_events(kind="unload_floor")
                    if "the linked nodes hold" in e.message
                ],
                15,
                what="the unload floor's alarm",
            )
            assert "4 of the 4 copies" in floor[-1].message, [e.message for e in floor]
            time.sleep(2.0)  # a few reconcile passes: still held
            assert (_ready(admin, "a"), _ready(admin, "b")) == (2, 2), admin.list_nodes()

            out = _confirm_unloads(cp1.address)
            assert "#2: 4 held unloads released on cp-1" in out, out
            wait_until(
                lambda: not [c for n in admin.list_nodes() for c in n.copies],
                20,
                what="every copy unloaded",
            )
            events = [e.message for e in admin.list_events(kind="unload_floor")]
            assert any("confirmed by the operator (#2): 4 held" in m for m in events), events
        for cp in (cp1, cp2):
            log = cp.log_path.read_text(errors="replace")
            assert "confirmed by the operator; releasing 4 unloads" in log, (cp.name, log[-3000:])


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Serves :attr:`payload` in 128 KiB pieces, 0.25 s apart (a download of a few seconds)."""

    payload = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        step = 128 << 10
        for start in range(0, len(self.payload), step):
            self.wfile.write(self.payload[start : start + step])
            self.wfile.flush()
            time.sleep(0.25)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _record_version(url: str, node_id: str, replica_id: str) -> int:
    """How many times the node's link record was written since it was created (etcd's
    ``version`` of the key)."""

    async def read() -> int:
        client = await connect(url)
        try:
            kv = await get(client, keys.node_link_key(node_id, replica_id).encode())
            return 0 if kv is None else kv.version
        finally:
            await client.close()

    return asyncio.run(read())


def test_download_progress_travels_on_the_stream_not_in_etcd(tmp_path: Path) -> None:
    """A ~5 s download reports progress every 0.5 s. Before the fix each report rewrote the
    node's record in etcd (a dozen revisions for one load); now the record changes only with
    the copy's state, while ListNodes still shows the progress (from the live stream)."""
    model = make_mlp(tmp_path / "big.onnx", hidden=(768, 768), seed=4)
    _Trickle.payload = model.read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
            url = mesh.start_etcd()
            cp = mesh.start_controlplane("cp-1")
            mesh.start_node("n1", [cp.address])
            with AdminClient(cp.address) as admin:
                wait_until(lambda: len(admin.list_nodes()) == 1, 20, what="n1 linked")
                before = _record_version(url, "n1", "cp-1")
                artifact = f"http://127.0.0.1:{server.server_address[1]}/big.onnx"
                admin.register_model("big", artifact, sha256_file(model), copies=1)
                progress = wait_until(
                    lambda: [
                        c.bytes_fetched
                        for n in admin.list_nodes()
                        for c in n.copies
                        if c.state == mesh_pb2.LOADING and c.bytes_fetched > 0
                    ],
                    20,
                    interval=0.05,
                    what="download progress in ListNodes",
                )
                wait_copies(admin, "big", 1, timeout=60)
                writes = _record_version(url, "n1", "cp-1") - before
        assert progress[0] > 0
        # LOADING, READY and at most two more (the total becoming known, measurements)
        assert writes <= 4, f"{writes} record writes for one load"
    finally:
        server.shutdown()


def test_etcd_soak_smoke() -> None:
    """bench/etcd_soak.py in small: the noisy cycle runs, the leader compacts (history kept:
    100 revisions), and a replica with etcd down costs little CPU and exits on SIGTERM."""
    root = Path(__file__).resolve().parents[2]
    argv = ["--duration", "8", "--sample-s", "4", "--keep", "100", "--outage-s", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.etcd_soak", *argv],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["cycles"] >= 2 and result["final"]["revision"] > 120, result
    assert result["compacted"] is True, result
    assert result["outage"]["cp_cpu_share_of_a_core"] < 0.05, result["outage"]
    assert result["outage"]["sigterm_exit_s"] is not None, result["outage"]
    assert result["outage"]["sigterm_exit_s"] <= 12.0, result["outage"]


async def test_a_replaced_store_whose_revision_grew_past_is_noticed_by_its_id(
    etcd: EtcdServer,
) -> None:
    """A single-member etcd restarted empty keeps its cluster id; if its revision has grown
    past the one the replica saw before the next check, only the store's id (``store-id``,
    written once per store) tells: the guard raises the alarm and reloads the mirror."""
    client = await connect(etcd.url)
    registry = EtcdRegistry(client)
    mirror = PrefixMirror(client, keys.MODELS)
    alarms: list[str] = []
    guard = StoreGuard(
        status=registry.store_status,
        compact=registry.compact,
        mirrors=lambda: [mirror],
        is_leader=lambda: False,
        alarm=alarms.append,
        store_id=registry.ensure_store_id,
    )
    try:
        await client.put(keys.model_key("old", "v1").encode(), b"x")
        await mirror.start()
        await guard.step()
        first = guard.store_id
        assert (
            first
            and guard.replacements == 0
            and list(mirror.items()) == [keys.model_key("old", "v1")]
        )

        etcd.stop()
        etcd.data_dir.rename(etcd.workdir / "data.lost")
        etcd.start()
        other = await connect(etcd.url)
        try:
            for i in range(mirror.revision + 50):  # the new store's revision runs past the old
                await other.put(b"/scratch", str(i).encode())
        finally:
            await other.close()

        async with asyncio.timeout(20):
            while True:  # the client reconnects to the restarted server
                try:
                    await guard.step()
                    break
                except Exception:
                    await asyncio.sleep(0.2)
        assert guard.replacements == 1 and len(alarms) == 1, alarms
        assert "store id changed" in alarms[0], alarms
        assert guard.store_id not in ("", first)
        assert dict(mirror.items()) == {}  # reloaded from the new, empty store
        await client.put(keys.model_key("new", "v1").encode(), b"y")
        await mirror.wait_for(lambda items: keys.model_key("new", "v1") in items, 10)
        await guard.step()
        assert guard.replacements == 1  # the same store now: nothing more
    finally:
        await mirror.close()
        await client.close()
