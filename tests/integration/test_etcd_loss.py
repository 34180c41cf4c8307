"""etcd loses its data (issue 14 §5): real etcd, a real replica and two real nodes on loopback.

etcd is stopped, its data directory moved away, and it is started again on the same address,
empty. The replica must notice (its store's revision went backwards), raise an alarm event,
reload its view from scratch -- a model registered afterwards is seen and placed -- and must not
react to the suddenly empty view by unloading every copy (the safety floor holds the mass unload
back). Before the fix the replica kept its old view: the new registration returned OK and was
never placed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_mlp
from meshserve.devtools.local import LocalMesh, wait_until
from meshserve.protos import mesh_pb2
from tests.support.mesh import copy_states, register_file, wait_copies

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _ready(admin: AdminClient, model: str) -> int:
    return sum(s == mesh_pb2.READY for s in copy_states(admin, model).values())


def test_a_replaced_store_is_noticed_reloaded_and_no_copy_is_unloaded(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        for name in ("n1", "n2"):
            mesh.start_node(name, [cp.address])
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
            floor = wait_until(
                lambda: admin.list_events(kind="unload_floor"), 15, what="the unload floor's alarm"
            )
            assert "4 of the 4 copies" in floor[0].message, floor[0].message

            register_file(admin, "c", make_mlp(tmp_path / "c.onnx", seed=3), copies=1)
            wait_copies(admin, "c", 1, timeout=40)  # seen and placed on the new store

            time.sleep(3.0)  # a few reconcile passes: nothing may have been unloaded
            assert (_ready(admin, "a"), _ready(admin, "b")) == (2, 2), admin.list_nodes()
        unloads = [line for p in mesh.processes for line in p.tail(400).splitlines()]
        assert not [line for line in unloads if "unload a/" in line or "unload b/" in line]
