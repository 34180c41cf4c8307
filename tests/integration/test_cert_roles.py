"""Certificates by role (issue 16, finding 4): a stolen node key cannot pose as the control plane;
and without TLS a node sends its join token to loopback control planes only (finding 14).

``meshctl certs init`` issues each role's certificates from its own CA, and whatever dials the
control plane trusts the control-plane CA only. Here a real gRPC server serves a node's real
certificate and key on a loopback address and records the metadata of every call it receives:
dialled as the control plane by an AdminClient, meshctl, the SDK and a real node process, it is
refused at the handshake and never sees the admin token, an API key or the join token. The same
server, dialled by a process that trusts the node CA (as every process trusted the one mesh CA
before), does receive the secret: the trust anchor is what stops it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from meshserve.client import NO_RETRY, MeshClient, TLSFiles
from meshserve.client._admin import AdminClient
from meshserve.common.errors import StatusError
from meshserve.common.security import server_credentials
from meshserve.devtools.local import LocalMesh, wait_until

pytestmark = pytest.mark.integration

X = np.zeros((1, 64), dtype=np.float32)


@dataclass
class _Recorder(grpc.GenericRpcHandler):
    """Records every call's metadata; answers UNIMPLEMENTED."""

    calls: list[tuple[tuple[str, str | bytes], ...]] = field(default_factory=list)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        self.calls.append(tuple(handler_call_details.invocation_metadata))  # type: ignore[attr-defined]

    def saw(self, secret: str) -> bool:
        return any(
            isinstance(v, str) and secret in v for metadata in self.calls for _, v in metadata
        )


@dataclass
class Impostor:
    """A server presenting node n1's certificate at ``address``."""

    address: str
    certs: Path
    recorder: _Recorder

    def client_tls(self, ca: str = "controlplane-ca") -> TLSFiles:
        return TLSFiles(
            self.certs / f"{ca}.crt",
            self.certs / "client.crt",
            self.certs / "client.key",
            node_ca=self.certs / "node-ca.crt",
        )


@pytest.fixture(scope="module")
def impostor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Impostor]:
    from meshserve.devtools.certs import init_certs

    certs = tmp_path_factory.mktemp("roles") / "certs"
    init_certs(certs, nodes=["n1"])
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[recorder])
    stolen = TLSFiles(None, certs / "node-n1.crt", certs / "node-n1.key")
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(stolen, require_client_cert=False)
    )
    server.start()
    try:
        yield Impostor(f"127.0.0.1:{port}", certs, recorder)
    finally:
        server.stop(grace=None)


def test_the_impostor_gets_the_admin_token_from_whoever_trusts_the_node_ca(
    impostor: Impostor,
) -> None:
    """The control experiment: trusting the node CA (the old single mesh CA) sends the token."""
    token = secrets.token_urlsafe(24)
    with AdminClient(impostor.address, tls=impostor.client_tls("node-ca"), token=token) as admin:
        with pytest.raises(StatusError) as err:
            admin.list_models()
    assert err.value.code == grpc.StatusCode.UNIMPLEMENTED  # it reached the impostor
    assert impostor.recorder.saw(token)


def test_admin_client_and_meshctl_refuse_a_node_certificate(impostor: Impostor) -> None:
    token = secrets.token_urlsafe(24)
    with AdminClient(impostor.address, tls=impostor.client_tls(), token=token) as admin:
        with pytest.raises(StatusError) as err:
            admin.list_models()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    certs = impostor.certs
    meshctl = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshserve.client.cli",
            f"--tls-ca={certs / 'controlplane-ca.crt'}",
            f"--tls-cert={certs / 'client.crt'}",
            f"--tls-key={certs / 'client.key'}",
            "nodes",
            "list",
            "-t",
            impostor.address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "MESHSERVE_ADMIN_TOKEN": token},
    )
    assert meshctl.returncode == 1 and "UNAVAILABLE" in meshctl.stderr, meshctl.stderr
    assert not impostor.recorder.saw(token)


def test_the_sdk_refuses_a_node_certificate_as_its_gateway(impostor: Impostor) -> None:
    key = secrets.token_urlsafe(24)
    for routing in ("gateway", "direct"):
        with MeshClient(
            impostor.address,
            tls=impostor.client_tls(),
            api_key=key,
            retry=NO_RETRY,
            timeout=5,
            routing=routing,  # type: ignore[arg-type]
        ) as client:
            with pytest.raises(StatusError) as err:
                client.infer("mlp", {"x": X})
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert not impostor.recorder.saw(key)


def test_a_node_refuses_a_node_certificate_as_its_control_plane(
    impostor: Impostor, tmp_path: Path
) -> None:
    token = secrets.token_urlsafe(24)
    (tmp_path / "join").write_text(token + "\n")
    certs = impostor.certs
    with LocalMesh(tmp_path / "mesh") as mesh:
        node = mesh.start_node(
            "n1",
            [impostor.address],
            extra=[
                f"--tls-ca={certs / 'controlplane-ca.crt'}",
                f"--tls-cert={certs / 'node-n1.crt'}",
                f"--tls-key={certs / 'node-n1.key'}",
                f"--join-token-file={tmp_path / 'join'}",
            ],
        )
        failed = f"stream to {impostor.address} failed: UNAVAILABLE"
        wait_until(
            lambda: node.log_path.read_text(errors="replace").count(failed) >= 2,
            60,
            what="the node to dial the impostor twice",
        )
        assert node.alive
    assert not impostor.recorder.saw(token)


def test_a_standalone_gateway_refuses_a_node_certificate_as_its_replica(
    impostor: Impostor, tmp_path: Path
) -> None:
    """The standalone gateway dials both kinds: replicas with --tls-ca (the control-plane CA),
    nodes with --tls-node-ca; its own API key never reaches the impostor."""
    key = secrets.token_urlsafe(24)
    (tmp_path / "key").write_text(key + "\n")
    certs = impostor.certs
    with LocalMesh(tmp_path / "mesh", tls=impostor.client_tls()) as mesh:
        gateway, _ = mesh.start_gateway(
            [impostor.address],
            extra=[
                f"--tls-ca={certs / 'controlplane-ca.crt'}",
                f"--tls-node-ca={certs / 'node-ca.crt'}",
                f"--tls-client-ca={certs / 'client-ca.crt'}",
                f"--tls-cert={certs / 'controlplane.crt'}",
                f"--tls-key={certs / 'controlplane.key'}",
                f"--api-key-file={tmp_path / 'key'}",
                "--log-level=DEBUG",
            ],
        )
        failed = f"routing feed from {impostor.address} failed"
        wait_until(
            lambda: gateway.log_path.read_text(errors="replace").count(failed) >= 2,
            60,
            what="the gateway to dial the impostor twice",
        )
        assert gateway.alive
    assert not impostor.recorder.saw(key)


def test_without_tls_a_node_sends_its_join_token_to_loopback_only(tmp_path: Path) -> None:
    """A remote control plane without TLS: the node refuses to start (nothing is dialled); a
    loopback one: the token goes over gRPC local credentials and the node joins."""
    token = secrets.token_urlsafe(24)
    (tmp_path / "join").write_text(token + "\n")
    node = [sys.executable, "-m", "meshserve.node", "--node-id", "n1"]
    node += ["--cache-dir", str(tmp_path / "cache"), f"--join-token-file={tmp_path / 'join'}"]
    refused = subprocess.run(
        [*node, "--control-plane", "127.0.0.1:1,192.0.2.10:7000"],  # TEST-NET: never dialled
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "not sending the join token to 192.0.2.10:7000 in the clear" in refused.stderr
    assert "--insecure-join" in refused.stderr and token not in refused.stderr + refused.stdout
    with LocalMesh(tmp_path / "mesh") as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=[f"--join-token-file={tmp_path / 'join'}"])
        mesh.start_node("n1", [cp.address], extra=[f"--join-token-file={tmp_path / 'join'}"])
        with AdminClient(cp.address) as admin:
            nodes = wait_until(admin.list_nodes, 30, what="n1 to join over loopback")
        assert [n.node_id for n in nodes] == ["n1"]
