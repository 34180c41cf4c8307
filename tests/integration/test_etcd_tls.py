"""The etcd link protected (issue 16 §8): one real etcd member with TLS, client certificates and
auth on (``EtcdProcess(secure=True)``, what ``meshctl up`` starts), the mesh running on it, and
clients without the right credentials refused by etcd itself.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.controlplane.etcd import EtcdAuth, connect
from meshserve.controlplane.etcd import _client as etcd
from meshserve.devtools.demo_models import make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, wait_until
from tests.support.etcd import EtcdServer
from tests.support.mesh import register_file, wait_copies

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = EtcdServer(workdir=tmp_path_factory.mktemp("etcd"), secure=True).start()
    try:
        yield server
    finally:
        server.close()


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port  # nothing listens there once closed


def _password_file(directory: Path, text: str, name: str = "wrong.password") -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def test_a_mesh_runs_on_etcd_with_tls_client_certificates_and_auth(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        url = mesh.start_etcd(secure=True)
        assert url.startswith("https://")
        assert "--etcd-password-file" in mesh.etcd_args
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("n1", [cp.address])
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            wait_until(lambda: len(admin.list_nodes()) == 1, 30, what="the node to join")
            register_file(admin, "mlp", model)
            wait_copies(admin, "mlp", 1)
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        with MeshClient(cp.address) as client:
            result = client.infer("mlp", {"x": x})
        assert np.allclose(result["y"], reference_outputs(model, {"x": x})["y"], atol=1e-5)
        password = mesh.etcd.password_file.read_text().strip()
        for proc in mesh.processes:  # the password went by file, never by argv
            assert all(password not in arg for arg in proc.argv)
            assert password not in proc.tail(400)


async def test_etcd_refuses_clients_without_credentials(secure_etcd: Any, tmp_path: Path) -> None:
    url = secure_etcd.url
    plain = url.replace("https://", "http://")
    with pytest.raises(ConnectionError):  # no TLS at all
        await connect(plain, timeout=2.0)
    with pytest.raises(ConnectionError):  # TLS, but no client certificate
        await connect(url, timeout=2.0, auth=EtcdAuth.from_files(ca=secure_etcd.ca_file))
    cert, key = secure_etcd.issue_client_cert("intruder")  # the CA's, but no etcd user
    intruder = EtcdAuth.from_files(ca=secure_etcd.ca_file, cert=cert, key=key)
    with pytest.raises(ConnectionError, match="permission denied"):
        await connect(url, timeout=2.0, auth=intruder)
    client = await connect(url, timeout=2.0, auth=intruder, verify=False)
    try:  # in particular, no node record with the intruder's own direct address
        with pytest.raises(etcd.ClientError, match="permission denied"):
            await client.put(b"/meshserve/nodes/evil/cp-1", b"{}")
        with pytest.raises(etcd.ClientError, match="permission denied"):
            await etcd.get_prefix(client, b"/meshserve/")
    finally:
        await client.close()
    wrong = EtcdAuth.from_files(
        ca=secure_etcd.ca_file,
        cert=cert,
        key=key,
        user="meshserve",
        password_file=_password_file(tmp_path, "not-the-password"),
    )
    with pytest.raises(ConnectionError, match="authentication failed"):
        await connect(url, timeout=2.0, auth=wrong)


@pytest.mark.parametrize("password", [False, True], ids=["certificate-auth", "password-auth"])
async def test_the_mesh_user_may_use_its_prefix_only(secure_etcd: Any, password: bool) -> None:
    """Certificate auth: the client certificate's CN (``meshserve``) is the etcd user; with a
    password too, the token names the user. Either way: ``/meshserve/`` and nothing else."""
    auth = secure_etcd.client_auth(password=password)
    client = await connect(secure_etcd.url, timeout=2.0, auth=auth)
    try:
        assert (client.metadata is not None) == password
        await client.put(b"/meshserve/tls-test", b"1")
        assert (await etcd.get(client, b"/meshserve/tls-test")) is not None
        with pytest.raises(etcd.ClientError, match="permission denied"):
            await client.put(b"/elsewhere", b"1")
    finally:
        await client.close()


async def test_a_password_alone_authenticates_and_survives_an_etcd_restart(
    secure_etcd: Any,
) -> None:
    """With a certificate that names no user, the password is what grants access. etcd's tokens
    die with a restart (or expire, or are unknown to another member): the client authenticates
    again by itself, for unary calls, watches and lease keep-alives alike."""
    cert, key = secure_etcd.issue_client_cert("intruder")
    auth = EtcdAuth.from_files(
        ca=secure_etcd.ca_file,
        cert=cert,
        key=key,
        user="meshserve",
        password_file=secure_etcd.password_file,
    )
    client = await connect(secure_etcd.url, timeout=2.0, auth=auth)
    forgotten = (("token", "forgotten.1"),)  # what etcd says of a token it no longer knows
    try:
        lease_id, _ = await etcd.grant_lease(client, 30)
        await client.put(b"/meshserve/restart-test", b"1")
        token = client.metadata
        secure_etcd.restart()
        kv = await _retry(lambda: etcd.get(client, b"/meshserve/restart-test"))
        assert kv is not None and kv.value == b"1"
        assert client.metadata != token  # the old token died with the restart: a new one
        client.metadata = forgotten
        assert (await etcd.get(client, b"/meshserve/restart-test")) is not None
        assert client.metadata != forgotten
        client.metadata = forgotten
        stream = await etcd.watch(client, b"/meshserve/", start_revision=1, prefix=True)
        await stream.cancel()
        assert client.metadata != forgotten
        client.metadata = forgotten
        ttl = await etcd.refresh_lease(client, lease_id)  # (etcd 3.4 checks no token here)
        assert ttl is not None and ttl > 0
    finally:
        await client.close()


async def _retry(op: Any, attempts: int = 40) -> Any:
    """``op`` until it succeeds while etcd comes back (bounded in count and time)."""
    deadline = time.monotonic() + 15.0
    for attempt in range(attempts):
        try:
            return await op()
        except etcd.TRANSIENT_ERRORS:
            if attempt == attempts - 1 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


async def test_a_list_of_endpoints_connects_when_the_first_is_down(secure_etcd: Any) -> None:
    dead = f"https://127.0.0.1:{_dead_port()}"
    urls = f"{dead},{secure_etcd.url}"
    client = await connect(urls, timeout=2.0, auth=secure_etcd.client_auth())
    try:
        assert str(client.channel.endpoint) == secure_etcd.url
        await client.put(b"/meshserve/failover", b"1")
    finally:
        await client.close()
    # Without a connect-time check (no password either: the certificate names the user), the
    # first calls find the dead endpoint and the next ones move on by themselves.
    cert_only = secure_etcd.client_auth(password=False)
    client = await connect(urls, timeout=2.0, auth=cert_only, verify=False)
    try:
        kv = await _retry(lambda: etcd.get(client, b"/meshserve/failover"))
        assert kv is not None and kv.value == b"1"
        assert str(client.channel.endpoint) == secure_etcd.url
    finally:
        await client.close()
    with pytest.raises(ConnectionError):  # every endpoint down
        await connect(f"{dead},https://127.0.0.1:{_dead_port()}", timeout=2.0, auth=cert_only)


def test_the_control_plane_refuses_bad_etcd_files_at_start_without_showing_secrets(
    tmp_path: Path,
) -> None:
    password = _password_file(tmp_path, "s3cret-never-shown")
    os.chmod(password, 0o644)
    private = _password_file(tmp_path, "s3cret-never-shown", "ok.password")
    base = [sys.executable, "-m", "meshserve.controlplane", "--listen", "127.0.0.1:0"]
    cases = [
        (["--etcd", "https://127.0.0.1:1", "--etcd-user", "meshserve",
          "--etcd-password-file", str(password)], "chmod 600"),
        (["--etcd", "http://10.0.0.5:2379", "--etcd-user", "meshserve",
          "--etcd-password-file", str(private)],
         "in the clear"),
        (["--etcd", "https://root:s3cret-never-shown@127.0.0.1:2379"], "--etcd-password-file"),
        (["--etcd", "http://a:1,https://b:1"], "mix"),
    ]  # fmt: skip
    for args, says in cases:
        proc = subprocess.run([*base, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert says in proc.stderr, proc.stderr[-2000:]
        assert "s3cret-never-shown" not in proc.stdout + proc.stderr
