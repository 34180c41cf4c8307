"""An edge node behind a real NAT (network namespaces, veth, iptables MASQUERADE).

etcd and the control plane run in ``cloud``; the node runs in ``edge`` with a private address and
only dials out through ``router``. The test proves the premise (cloud cannot reach the edge
node; the edge node can reach the control plane), then: join, placement, load and tunneled
queries through the NAT; a 30 s cut (DROP in the router) during which the control plane drops
the node within the lease TTL while the node keeps serving its LAN; restore, reconnect within
seconds, tunneled queries again, and the model never loaded twice. Skips (with the reason) where
namespaces cannot be made. Every client runs inside a namespace; the test's own namespace never
sends to these addresses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshserve.devtools.demo_models import make_mlp
from meshserve.devtools.etcd import find_etcd_binary
from meshserve.devtools.local import ManagedProcess, wait_until
from tests.support.netns import Nat, nat_available, nat_network

TTL = 5
CP_PORT, NODE_PORT, ETCD_PORT, ETCD_PEER = 8001, 9001, 23790, 23800
CUT_S = 30.0
NS_CLIENT = str(Path(__file__).resolve().parents[1] / "support" / "ns_client.py")

pytestmark = [
    pytest.mark.skipif(bool(nat_available()), reason=str(nat_available())),
    pytest.mark.timeout(240),
]


@dataclass
class Edge:
    nat: Nat
    tmp: Path
    model: Path
    node: ManagedProcess
    cp: ManagedProcess

    @property
    def target(self) -> str:
        return f"{self.nat.cloud_ip}:{CP_PORT}"

    def client(self, namespace: str, *args: str, timeout: float = 60) -> dict:  # type: ignore[type-arg]
        argv = self.nat.exec_argv(namespace, [sys.executable, NS_CLIENT, *args])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"ns_client {args[0]} failed: {done.stderr[-2000:]}")
        result: dict = json.loads(done.stdout)  # type: ignore[type-arg]
        return result

    def nodes(self) -> dict:  # type: ignore[type-arg]
        return self.client(self.nat.cloud, "nodes", self.target)["nodes"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("nat")
    procs: list[ManagedProcess] = []
    with nat_network() as nat:
        try:
            etcd = ManagedProcess(
                "etcd",
                nat.exec_argv(
                    nat.cloud,
                    [
                        find_etcd_binary(),
                        "--name=nat",
                        f"--data-dir={tmp / 'etcd'}",
                        f"--listen-client-urls=http://127.0.0.1:{ETCD_PORT}",
                        f"--advertise-client-urls=http://127.0.0.1:{ETCD_PORT}",
                        f"--listen-peer-urls=http://127.0.0.1:{ETCD_PEER}",
                        f"--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PEER}",
                        f"--initial-cluster=nat=http://127.0.0.1:{ETCD_PEER}",
                    ],
                ),
                tmp / "etcd.log",
            ).start()
            procs.append(etcd)
            wait_until(lambda: nat.can_connect(nat.cloud, "127.0.0.1", ETCD_PORT), 20, what="etcd")
            cp = ManagedProcess(
                "cp-1",
                nat.exec_argv(
                    nat.cloud,
                    [
                        sys.executable,
                        "-m",
                        "meshserve.controlplane",
                        "--etcd",
                        f"http://127.0.0.1:{ETCD_PORT}",
                        "--listen",
                        f"0.0.0.0:{CP_PORT}",
                        "--advertise",
                        f"{nat.cloud_ip}:{CP_PORT}",
                        "--replica-id",
                        "cp-1",
                        "--lease-ttl",
                        str(TTL),
                        "--keepalive-ms",
                        "1000",
                        "--telemetry-interval-ms",
                        "500",
                    ],
                ),
                tmp / "cp-1.log",
            ).start()
            procs.append(cp)
            wait_until(
                lambda: nat.can_connect(nat.cloud, nat.cloud_ip, CP_PORT), 30, what="control plane"
            )
            node = ManagedProcess(
                "edge-1",
                nat.exec_argv(
                    nat.edge,
                    [
                        sys.executable,
                        "-m",
                        "meshserve.node",
                        "--control-plane",
                        f"{nat.cloud_ip}:{CP_PORT}",
                        "--node-id",
                        "edge-1",
                        "--labels",
                        "tier=edge,zone=shop-1",
                        "--listen",
                        f"{nat.edge_ip}:{NODE_PORT}",
                        "--lan-only",
                        "--keepalive-ms",
                        "1000",
                        "--cache-dir",
                        str(tmp / "edge-cache"),
                        "--artifact-root",
                        str(tmp),
                    ],
                ),
                tmp / "edge-1.log",
            ).start()
            procs.append(node)
            yield Edge(nat, tmp, make_mlp(tmp / "mlp.onnx"), node, cp)
        finally:
            # The control plane first, then the node (nothing to hand its copies to: it leaves
            # at once), then etcd.
            for proc in procs[1:2] + procs[2:] + procs[:1]:
                proc.stop(grace_s=5.0)
            for proc in procs:
                print(f"----- {proc.name} -----\n{proc.tail(30)}", file=sys.stderr)


def test_premise_cloud_cannot_reach_the_edge_node_but_the_edge_reaches_the_cloud(
    edge: Edge,
) -> None:
    nat = edge.nat
    wait_until(
        lambda: nat.can_connect(nat.edge, nat.edge_ip, NODE_PORT), 30, what="node's LAN port"
    )
    assert not nat.can_connect(nat.cloud, nat.edge_ip, NODE_PORT), "cloud reached a private address"
    assert nat.can_connect(nat.edge, nat.cloud_ip, CP_PORT), "the edge cannot dial out"


def test_join_place_load_and_query_through_the_nat(edge: Edge) -> None:
    wait_until(lambda: "edge-1" in edge.nodes(), 30, what="edge-1 to join")
    edge.client(edge.nat.cloud, "register", edge.target, "mlp", str(edge.model))
    wait_until(
        lambda: edge.nodes().get("edge-1", {}).get("copies", {}).get("mlp") == "READY",
        60,
        what="mlp READY on edge-1",
    )
    out = edge.client(edge.nat.cloud, "infer", edge.target, "mlp", str(edge.model), "10")
    assert out["errors"] == [] and out["correct"] == 10
    assert set(out["nodes"]) == {"edge-1"}, "answered through the node's own stream"


def test_a_30s_cut_then_restore(edge: Edge) -> None:
    nat = edge.nat
    wait_until(
        lambda: edge.nodes().get("edge-1", {}).get("copies", {}).get("mlp") == "READY",
        60,
        what="mlp READY on edge-1",
    )
    timeline: dict[str, float] = {}
    t0 = time.monotonic()
    nat.cut()
    try:
        wait_until(lambda: "edge-1" not in edge.nodes(), TTL + 3, what="edge-1 marked gone")
        timeline["gone_after_s"] = time.monotonic() - t0
        assert timeline["gone_after_s"] <= TTL + 1
        # Autonomy: the node keeps serving its LAN while the control plane is unreachable.
        lan = edge.client(
            nat.edge, "infer", f"{nat.edge_ip}:{NODE_PORT}", "mlp", str(edge.model), "5"
        )
        assert lan["errors"] == [] and lan["correct"] == 5 and set(lan["nodes"]) == {"edge-1"}
        timeline["lan_served_at_s"] = time.monotonic() - t0
        remaining = CUT_S - (time.monotonic() - t0)
        if remaining > 0:
            time.sleep(remaining)
    finally:
        nat.restore()
    restored = time.monotonic()
    timeline["restored_at_s"] = restored - t0
    wait_until(
        lambda: edge.nodes().get("edge-1", {}).get("copies", {}).get("mlp") == "READY",
        30,
        interval=0.2,
        what="edge-1 back with its copy",
    )
    timeline["reconnect_s"] = time.monotonic() - restored
    out = edge.client(nat.cloud, "infer", edge.target, "mlp", str(edge.model), "10")
    assert out["errors"] == [] and out["correct"] == 10 and set(out["nodes"]) == {"edge-1"}
    time.sleep(3)  # any stray Load would show in the log by now
    loads = [line for line in edge.node.tail(400).splitlines() if "loading mlp/" in line]
    assert len(loads) == 1, f"the model was loaded {len(loads)} times: {loads}"
    print(f"NAT cut/restore timeline: {json.dumps({k: round(v, 2) for k, v in timeline.items()})}")
