"""A real NAT on one machine: three network namespaces the test creates and removes.

    cloud (10.77.<n>.2)  ── veth ──  router (10.77.<n>.1 | 192.168.<n>.1, MASQUERADE)  ── veth ──
    edge (192.168.<n>.2, default route via the router)

``cloud`` has no route to the edge LAN and no default route; no namespace has a route off the
machine, so every packet stays inside them. Processes run inside a namespace with
``ip netns exec``. The test process itself (the machine's own namespace) never sends to any of
these addresses: probes run *inside* the namespaces (:meth:`Nat.can_connect`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["Nat", "nat_available", "nat_network"]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=20)


def nat_available() -> str | None:
    """None when namespaces, veth and iptables NAT can be used here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables)"
    probe = f"msprobe{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        nat = _run("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", check=False)
        if nat.returncode != 0:
            return f"iptables NAT is not usable: {nat.stderr.strip()[:200]}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Nat:
    cloud: str
    router: str
    edge: str
    cloud_ip: str
    router_cloud_ip: str
    router_edge_ip: str
    edge_ip: str

    def exec_argv(self, namespace: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", namespace, *argv]

    def can_connect(self, namespace: str, host: str, port: int, timeout: float = 2.0) -> bool:
        """Open a TCP connection from inside ``namespace`` (never from the test's own)."""
        code = (
            "import socket,sys\n"
            f"s=socket.socket(); s.settimeout({timeout})\n"
            f"sys.exit(0 if s.connect_ex(({host!r},{port}))==0 else 1)\n"
        )
        done = _run(*self.exec_argv(namespace, [sys.executable, "-c", code]), check=False)
        return done.returncode == 0

    def http_ok(self, namespace: str, url: str, timeout: float = 2.0) -> bool:
        """GET ``url`` from inside ``namespace``; True on a 2xx answer."""
        code = (
            "import sys, urllib.request\n"
            "try:\n"
            f"    urllib.request.urlopen({url!r}, timeout={timeout})\n"
            "except Exception:\n"
            "    sys.exit(1)\n"
        )
        done = _run(*self.exec_argv(namespace, [sys.executable, "-c", code]), check=False)
        return done.returncode == 0

    def cut(self) -> None:
        """Drop everything the router would forward (both directions)."""
        _run(*self.exec_argv(self.router, ["iptables", "-I", "FORWARD", "1", "-j", "DROP"]))

    def restore(self) -> None:
        _run(*self.exec_argv(self.router, ["iptables", "-D", "FORWARD", "-j", "DROP"]))


@contextlib.contextmanager
def nat_network() -> Iterator[Nat]:
    """Create the three namespaces (unique names), yield them, and always remove them."""
    n = 100 + os.getpid() % 100
    tag = f"ms{os.getpid()}"
    nat = Nat(
        cloud=f"{tag}-cloud",
        router=f"{tag}-router",
        edge=f"{tag}-edge",
        cloud_ip=f"10.77.{n}.2",
        router_cloud_ip=f"10.77.{n}.1",
        router_edge_ip=f"192.168.{n}.1",
        edge_ip=f"192.168.{n}.2",
    )
    created: list[str] = []
    try:
        for ns in (nat.cloud, nat.router, nat.edge):
            _run("ip", "netns", "add", ns)
            created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # cloud <-> router
        _run("ip", "link", "add", f"{tag}c", "type", "veth", "peer", "name", f"{tag}rc")
        _run("ip", "link", "set", f"{tag}c", "netns", nat.cloud)
        _run("ip", "link", "set", f"{tag}rc", "netns", nat.router)
        # edge <-> router
        _run("ip", "link", "add", f"{tag}e", "type", "veth", "peer", "name", f"{tag}re")
        _run("ip", "link", "set", f"{tag}e", "netns", nat.edge)
        _run("ip", "link", "set", f"{tag}re", "netns", nat.router)
        for ns, dev, addr in (
            (nat.cloud, f"{tag}c", f"{nat.cloud_ip}/24"),
            (nat.router, f"{tag}rc", f"{nat.router_cloud_ip}/24"),
            (nat.router, f"{tag}re", f"{nat.router_edge_ip}/24"),
            (nat.edge, f"{tag}e", f"{nat.edge_ip}/24"),
        ):
            _run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        _run("ip", "-n", nat.edge, "route", "add", "default", "via", nat.router_edge_ip)
        _run("ip", "netns", "exec", nat.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        edge_lan = nat.edge_ip.rsplit(".", 1)[0] + ".0/24"
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-s", edge_lan, "-o", f"{tag}rc"]
        _run(*nat.exec_argv(nat.router, ["iptables", *masquerade, "-j", "MASQUERADE"]))
        yield nat
    finally:
        for ns in reversed(created):  # deleting a namespace deletes its veth ends too
            _run("ip", "netns", "del", ns, check=False)
