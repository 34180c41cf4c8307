"""The chaos suite: faults under a bounded closed-loop load, with every answer checked.

One mesh of real processes on loopback (a real etcd, control-plane replicas cp-1 and cp-2,
nodes n1 (direct port), n2 (tunnel only), n3 (direct port); lease TTL 3 s) serves model ``mlp``
(2 copies) while :class:`~tests.chaos.load.Load` queries it through both gateways. The faults
run one after another on the same mesh; each must show:

- zero wrong answers;
- zero requests lost: every query of the ``raw`` group (one attempt, no retries) is answered or
  fails with a retriable status before its deadline, and the ``sdk`` group (retries + hedging)
  sees zero failures;
- automatic recovery, timed from the fault (for the SIGSTOP, from the SIGCONT) until the mesh is
  whole again (for the rollout: until the new version serves every query on its copies); the
  table of fault -> failed requests -> recovery time is printed at the end
  (``pytest_terminal_summary`` in conftest.py).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshserve.client._admin import AdminClient
from meshserve.controlplane import keys
from meshserve.controlplane.etcd import connect
from meshserve.devtools.demo_models import make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, ManagedProcess, wait_until
from meshserve.protos import mesh_pb2
from tests.chaos.load import RETRIABLE, Load, Outcome
from tests.support.mesh import register_file
from tests.support.rollout import roll_out

TTL = 3
MODEL = "mlp"
RESULTS: list[dict[str, Any]] = []  # one row per fault, printed by conftest.py


def _etcd_value(url: str, key: str) -> bytes | None:
    async def read() -> bytes | None:
        client = await connect(url)
        try:
            kv = await client.get(key.encode())
            return None if kv is None else bytes(kv.value)
        finally:
            await client.close()

    return asyncio.run(read())


@dataclass
class Chaos:
    mesh: LocalMesh
    tmp: Path
    planes: dict[str, ManagedProcess]
    ports: dict[str, int]
    nodes: dict[str, ManagedProcess]
    load: Load
    versions: dict[str, Path]

    @property
    def targets(self) -> list[str]:
        return [p.address for p in self.planes.values()]

    def admin(self) -> AdminClient:
        live = [p for p in self.planes.values() if p.alive()]
        return AdminClient(live[0].address, timeout=5)

    def ready_copies(self) -> dict[str, list[str]]:
        """variant -> nodes with a READY copy of ``mlp`` (as the control plane sees them)."""
        with self.admin() as admin:
            out: dict[str, list[str]] = {}
            for node in admin.list_nodes():
                for copy in node.copies:
                    if copy.model == MODEL and copy.state == mesh_pb2.READY:
                        out.setdefault(copy.variant, []).append(node.node_id)
            return out

    def holders(self, variant: str = "v1") -> list[str]:
        return sorted(self.ready_copies().get(variant, []))

    def linked(self) -> set[str]:
        with self.admin() as admin:
            return {n.node_id for n in admin.list_nodes()}

    def linked_to_every_replica(self) -> bool:
        with self.admin() as admin:
            return all(len(n.replicas) == len(self.planes) for n in admin.list_nodes())

    def start_node(self, name: str) -> ManagedProcess:
        direct = name != "n2"
        proc = self.mesh.start_node(name, self.targets, direct=direct)
        self.nodes[name] = proc
        return proc

    def start_plane(self, name: str) -> ManagedProcess:
        proc = self.mesh.start_controlplane(name, port=self.ports[name])
        self.planes[name] = proc
        return proc

    def leader(self) -> str:
        value = _etcd_value(self.mesh.etcd_url, keys.LEADER)
        return value.decode() if value else ""

    def healthy(self, variant: str = "v1", copies: int = 2) -> bool:
        return len(self.holders(variant)) >= copies and self.linked() == set(self.nodes)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    tmp = tmp_path_factory.mktemp("chaos")
    with LocalMesh(tmp, lease_ttl_s=TTL) as mesh:
        mesh.start_etcd()
        ports = {"cp-1": 0, "cp-2": 0}
        planes: dict[str, ManagedProcess] = {}
        for name in ports:
            planes[name] = mesh.start_controlplane(name)
            ports[name] = int(planes[name].address.rsplit(":", 1)[1])
        versions = {
            "v1": make_mlp(tmp / "mlp-v1.onnx", seed=1),
            "v2": make_mlp(tmp / "mlp-v2.onnx", seed=2),
        }
        pool = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
        expected = {v: reference_outputs(p, {"x": pool})["y"] for v, p in versions.items()}
        state = Chaos(mesh, tmp, planes, ports, {}, None, versions)  # type: ignore[arg-type]
        for name in ("n1", "n2", "n3"):
            state.start_node(name)
        with state.admin() as admin:
            wait_until(lambda: len(admin.list_nodes()) == 3, 60, what="3 nodes to link")
            register_file(admin, MODEL, versions["v1"], copies=2, version="v1")
            wait_until(lambda: state.healthy(), 90, what="2 READY copies of v1")
            roll_out(admin, MODEL, "v1")  # queries naming no version follow the alias "live"
        state.load = Load(",".join(state.targets), MODEL, pool, {"v1": expected["v1"]}).start()
        state.load.expect("v2", expected["v2"])
        try:
            yield state
        finally:
            state.load.stop()


def _run_fault(
    chaos: Chaos,
    name: str,
    inject: Callable[[], float | None],
    recovered: Callable[[], bool],
    *,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Inject a fault under load; wait for recovery; check and record the outcomes."""
    time.sleep(1.0)  # a steady stretch before the fault
    started = time.monotonic()
    clock = inject()  # the moment recovery is timed from (default: the fault's start)
    origin = started if clock is None else clock
    wait_until(recovered, timeout, interval=0.2, what=f"recovery from {name}")
    recovery = time.monotonic() - origin
    time.sleep(1.0)  # a steady stretch after it
    outcomes = chaos.load.since(started - 0.5)
    row = _summarise(name, outcomes, recovery)
    RESULTS.append(row)
    _check(row, outcomes)
    return row


def _summarise(name: str, outcomes: list[Outcome], recovery: float) -> dict[str, Any]:
    raw = [o for o in outcomes if o.group == "raw"]
    sdk = [o for o in outcomes if o.group == "sdk"]
    failed = [o for o in raw if not o.ok]
    codes: dict[str, int] = {}
    for o in failed:
        codes[o.code] = codes.get(o.code, 0) + 1
    return {
        "fault": name,
        "requests": len(outcomes),
        "raw_failed": len(failed),
        "raw_failed_codes": codes,
        "raw_late_or_not_retriable": sum(o.late or o.code not in RETRIABLE for o in failed),
        "sdk_failed": sum(not o.ok for o in sdk),
        "wrong": sum(o.wrong for o in outcomes),
        "recovery_s": round(recovery, 2),
        "answered_by": sorted({o.node for o in outcomes if o.ok}),
    }


def _check(row: dict[str, Any], outcomes: list[Outcome]) -> None:
    assert row["requests"] > 50, f"too little load to judge: {row}"
    assert row["wrong"] == 0, f"wrong answers: {row}"
    assert row["raw_late_or_not_retriable"] == 0, f"a query was lost or failed late: {row}"
    sdk_errors = [o for o in outcomes if o.group == "sdk" and not o.ok]
    assert row["sdk_failed"] == 0, f"client-visible failures through the SDK: {sdk_errors[:3]}"


def test_kill_9_a_node(chaos: Chaos) -> None:
    victim = chaos.holders()[0]

    def inject() -> None:
        chaos.nodes[victim].kill()

    def recovered() -> bool:
        holders = chaos.holders()
        return len(holders) >= 2 and victim not in holders and victim not in chaos.linked()

    _run_fault(chaos, "kill -9 a node", inject, recovered)
    chaos.start_node(victim)
    wait_until(lambda: chaos.healthy(), 60, what=f"{victim} back")


def test_kill_9_the_control_plane_leader(chaos: Chaos) -> None:
    leader = chaos.leader()
    assert leader in chaos.planes, f"no leader among {list(chaos.planes)}: {leader!r}"
    other = next(n for n in chaos.planes if n != leader)

    def inject() -> None:
        chaos.planes[leader].kill()

    def recovered() -> bool:
        # The other replica leads and has every node linked (it schedules: copies stay whole).
        return chaos.leader() == other and chaos.healthy()

    _run_fault(chaos, "kill -9 the control-plane leader", inject, recovered)
    chaos.start_plane(leader)
    wait_until(
        chaos.linked_to_every_replica,
        60,
        what=f"nodes linked to {leader} again",
    )


def test_sigterm_a_control_plane_replica(chaos: Chaos) -> None:
    leaving = chaos.leader()
    other = next(n for n in chaos.planes if n != leaving)

    def inject() -> None:
        chaos.planes[leaving].signal(signal.SIGTERM)

    def recovered() -> bool:
        # Leadership handed over (resigned, not expired) and the replica gone, nodes served by
        # the other replica's streams.
        return not chaos.planes[leaving].alive() and chaos.leader() == other and chaos.healthy()

    row = _run_fault(chaos, "SIGTERM the leader replica (handover)", inject, recovered)
    assert row["sdk_failed"] == 0
    chaos.start_plane(leaving)
    wait_until(
        chaos.linked_to_every_replica,
        60,
        what=f"nodes linked to {leaving} again",
    )


def test_restart_etcd(chaos: Chaos) -> None:
    etcd = chaos.mesh.etcd

    def inject() -> None:
        etcd.stop()
        time.sleep(3.0)  # etcd down: the data plane serves from the replicas' views
        etcd.start()

    def recovered() -> bool:
        # Writes work again (an idempotent re-register goes through etcd) and the mesh is whole.
        with chaos.admin() as admin:
            register_file(admin, MODEL, chaos.versions["v1"], copies=2, version="v1")
        return chaos.healthy()

    _run_fault(chaos, "restart etcd (3 s down)", inject, recovered)


def test_sigstop_a_node_for_10_s(chaos: Chaos) -> None:
    victim = chaos.holders()[0]

    def inject() -> float:
        chaos.nodes[victim].signal(signal.SIGSTOP)
        time.sleep(10.0)
        chaos.nodes[victim].signal(signal.SIGCONT)
        return time.monotonic()

    def recovered() -> bool:
        return chaos.healthy() and victim in chaos.linked()

    _run_fault(chaos, "SIGSTOP a node 10 s (grey failure)", inject, recovered)


def test_drain_a_node(chaos: Chaos) -> None:
    victim = chaos.holders()[0]

    def inject() -> None:
        chaos.nodes[victim].signal(signal.SIGTERM)

    def recovered() -> bool:
        holders = chaos.holders()
        return not chaos.nodes[victim].alive() and len(holders) >= 2 and victim not in holders

    row = _run_fault(chaos, "drain a node (SIGTERM)", inject, recovered)
    assert row["raw_failed"] == 0, f"a drain fails no query, even without retries: {row}"
    chaos.start_node(victim)
    wait_until(lambda: chaos.healthy(), 60, what=f"{victim} back")


def test_roll_the_model_to_a_new_version(chaos: Chaos) -> None:
    rolled: list[float] = []

    def inject() -> None:
        with chaos.admin() as admin:  # v2 registered and the alias moved while v2 still loads
            roll_out(admin, MODEL, "v2", chaos.versions["v2"], copies=2)
        rolled.append(time.monotonic())

    def recovered() -> bool:
        return len(chaos.holders("v2")) >= 2

    row = _run_fault(chaos, "roll the model to a new version", inject, recovered)
    assert row["raw_failed"] == 0, f"a rollout fails no query, even without retries: {row}"
    after = [o for o in chaos.load.since(rolled[0] + 0.5) if o.ok]
    assert after and {o.variant for o in after} == {"v2"}, "traffic moved to v2"


ETCD_DB: dict[str, int] = {}  # etcd's figures after the faults, printed by conftest.py


def test_etcd_database_stays_small(chaos: Chaos) -> None:
    """After every fault above (issue 14 §5): etcd's database, as etcd reports it (dbSize), stays
    small -- node records are rewritten only on state changes, and the leader compacts."""
    from meshserve.controlplane.etcd._client import status

    async def read() -> dict[str, int]:
        client = await connect(chaos.mesh.etcd_url)
        try:
            st = await status(client)
            return {"revision": st.revision, "db_size": st.db_size, "in_use": st.db_size_in_use}
        finally:
            await client.close()

    ETCD_DB.update(asyncio.run(read()))
    assert ETCD_DB["db_size"] < 32 << 20, ETCD_DB
