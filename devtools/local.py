"""A local mesh of real processes: etcd, control-plane replicas and nodes on loopback.

Used by ``meshctl up`` and by the integration tests, so the demo and the tests run the same path.
Every child is started in its own session and is stopped (SIGTERM, then SIGKILL after a grace
period) by :meth:`LocalMesh.close`, which is safe to call more than once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from meshserve.common.security import TLSFiles, sync_channel
from meshserve.protos import inference_pb2, inference_pb2_grpc

__all__ = ["LocalMesh", "ManagedProcess", "free_port", "wait_until"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], Any], timeout: float, *, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout:.0f}s waiting for {what}"
        + (f" (last error: {last_exc!r})" if last_exc else "")
    )


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log_path: Path
    address: str = ""
    env: Mapping[str, str] | None = None
    role: str = ""  # "controlplane", "node", "gateway" (or "" for another process)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (a crash)."""
        self.signal(signal.SIGKILL)
        self._reap(5.0)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL."""
        self.signal(signal.SIGTERM)
        if not self._reap(grace_s):
            self.signal(signal.SIGKILL)
            self._reap(5.0)

    def _reap(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        if self._log is not None:
            self._log.close()
            self._log = None
        return True

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _live(address: str, tls: TLSFiles | None = None) -> bool:
    with sync_channel(address, tls) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        return bool(stub.ServerLive(inference_pb2.ServerLiveRequest(), timeout=1.0).live)


class LocalMesh:
    """Start and own the processes of a mesh on loopback. Use as a context manager."""

    def __init__(
        self,
        workdir: Path,
        *,
        lease_ttl_s: int = 5,
        env: Mapping[str, str] | None = None,
        tls: TLSFiles | None = None,
        artifact_roots: Sequence[Path] | None = None,
        trust_node_labels: bool = True,
    ) -> None:
        """``tls``: what the readiness probe dials control planes with (a secured mesh: pass
        the security flags in ``extra`` of :meth:`start_controlplane` / :meth:`start_node`).
        ``artifact_roots``: the directories nodes may read ``file://`` artifacts from (their
        ``--artifact-root``); default: ``workdir`` and the system's temporary directory, where
        ``meshctl up`` and the tests write their models (a node alone allows none).
        ``trust_node_labels``: control planes started here place by the labels nodes claim
        (``--labels``) too, not only by admin-side ones -- a local mesh's nodes are all yours;
        False starts them as a production replica runs by default."""
        self.workdir = workdir
        self.artifact_roots = (
            [workdir, Path(tempfile.gettempdir())] if artifact_roots is None else artifact_roots
        )
        self.tls = tls
        self.lease_ttl_s = lease_ttl_s
        self.trust_node_labels = trust_node_labels
        self.env = env
        self.etcd: Any = None
        self.etcd_url = ""
        self.etcd_args: list[str] = []  # --etcd and its TLS / user options, for control planes
        self.processes: list[ManagedProcess] = []

    def start_etcd(self, *, secure: bool = False) -> str:
        """Start a one-member etcd; ``secure``: TLS, client certificates and auth on (its files
        under ``<workdir>/etcd/tls``; see :class:`~meshserve.devtools.etcd.EtcdProcess`)."""
        from meshserve.devtools.etcd import EtcdProcess  # the mesh's own etcd launcher

        self.etcd = EtcdProcess(workdir=self.workdir / "etcd", secure=secure).start()
        self.etcd_url = str(self.etcd.url)
        self.etcd_args = list(self.etcd.client_args())
        return self.etcd_url

    def use_etcd(self, url: str, args: Sequence[str] = ()) -> None:
        """Use an etcd this mesh does not own: ``url``, and ``args`` (its ``--etcd-*`` options)
        for the control planes."""
        self.etcd_url = url
        self.etcd_args = ["--etcd", url, *args]

    def start_controlplane(
        self,
        name: str = "cp-1",
        *,
        port: int | None = None,
        extra: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> ManagedProcess:
        address = f"127.0.0.1:{port or free_port()}"
        argv = [
            sys.executable,
            "-m",
            "meshserve.controlplane",
            *(self.etcd_args or ["--etcd", self.etcd_url]),
            "--listen",
            address,
            "--replica-id",
            name,
            "--lease-ttl",
            str(self.lease_ttl_s),
            *(["--trust-node-labels"] if self.trust_node_labels else []),
            *extra,
        ]
        return self._serve(name, argv, address, "controlplane", timeout)

    def start_node(
        self,
        name: str,
        control_planes: Sequence[str],
        *,
        labels: Mapping[str, str] | None = None,
        direct: bool = False,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        """Start a node process; ``env`` adds to (or overrides) the mesh's environment."""
        label_text = ",".join(f"{k}={v}" for k, v in (labels or {}).items())
        argv = [
            sys.executable,
            "-m",
            "meshserve.node",
            "--control-plane",
            ",".join(control_planes),
            "--node-id",
            name,
            "--cache-dir",
            str(self.workdir / f"{name}-cache"),
        ]
        if label_text:
            argv += ["--labels", label_text]
        for root in self.artifact_roots:
            argv += ["--artifact-root", str(root)]
        if direct:
            argv += ["--listen", "127.0.0.1:0"]
        argv += list(extra)
        merged = None if env is None else {**(self.env or os.environ), **env}
        proc = ManagedProcess(
            name, argv, self.workdir / f"{name}.log", env=merged or self.env, role="node"
        )
        self.processes.append(proc.start())
        return proc

    def start_gateway(
        self,
        feed: Sequence[str],
        *,
        name: str = "",
        port: int | None = None,
        zone: str = "",
        extra: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> tuple[ManagedProcess, str]:
        """Start a standalone gateway (``meshserve-gateway``) routing from the feed of the
        replicas ``feed`` (their addresses); returns the process and its address once it
        serves (ServerLive). Security flags (TLS, API keys) go in ``extra``."""
        name = name or f"gw-{sum(1 for p in self.processes if p.role == 'gateway') + 1}"
        address = f"127.0.0.1:{port or free_port()}"
        argv = [
            sys.executable,
            "-m",
            "meshserve.controlplane.dataplane.standalone",
            "--feed",
            ",".join(feed),
            "--listen",
            address,
            *(["--zone", zone] if zone else []),
            *extra,
        ]
        return self._serve(name, argv, address, "gateway", timeout), address

    def _serve(
        self, name: str, argv: list[str], address: str, role: str, timeout: float
    ) -> ManagedProcess:
        """Start a process that serves gRPC at ``address`` and wait until it answers (or says
        why it did not start)."""
        proc = ManagedProcess(
            name, argv, self.workdir / f"{name}.log", address, self.env, role=role
        ).start()
        self.processes.append(proc)
        try:
            wait_until(
                lambda: not proc.alive() or _live(address, self.tls),
                timeout,
                what=f"{name} to serve",
            )
        except TimeoutError:
            raise RuntimeError(f"{name} did not start:\n{proc.tail()}") from None
        if not proc.alive():
            raise RuntimeError(f"{name} exited:\n{proc.tail()}")
        return proc

    def close(self) -> None:
        """Stop everything: the control planes first, so nodes (whose SIGTERM drains: they wait
        for their copies to move) find no replica to hand over to and leave at once."""
        planes = [p for p in self.processes if p.role == "controlplane"]
        for proc in [*reversed(planes), *reversed(self.processes)]:
            with contextlib.suppress(Exception):
                proc.stop(grace_s=10.0)
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.stop()
            self.etcd = None

    def __enter__(self) -> LocalMesh:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close()
        if exc_type is not None:  # a failed run: show what every process said last
            for proc in self.processes:
                header = f"----- {proc.name} ({proc.log_path}) -----"
                print(f"{header}\n{proc.tail(40)}", file=sys.stderr)
