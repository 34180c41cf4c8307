"""A secured mesh for real: mutual TLS everywhere, join tokens, node identity, the admin token and
tenant API keys; and no secret in any log line or span.

Real etcd, a real control-plane process and a real node process (its direct OIP port behind
mTLS, so the gateway's channel to it is mTLS too), certificates from ``meshctl certs init``'s
code. The tests share one mesh (module scope) and run in file order: the last one stops the
processes (flushing their spans to their logs) and greps everything for the secrets.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshserve.client import MeshClient, TLSFiles
from meshserve.client._admin import AdminClient
from meshserve.common.codec import build_request
from meshserve.common.errors import PermissionDenied, StatusError, Unauthenticated
from meshserve.common.security import JOIN_TOKEN_HEADER, channel_credentials
from meshserve.devtools.demo_models import make_mlp, reference_outputs, sha256_file
from meshserve.devtools.local import LocalMesh, ManagedProcess, wait_until
from meshserve.protos import inference_pb2_grpc, mesh_pb2, mesh_pb2_grpc
from tests.support.pki import issue_from

pytestmark = pytest.mark.integration

_SPANS = InMemorySpanExporter()
X = np.random.default_rng(7).standard_normal((1, 64)).astype(np.float32)


def _secret() -> str:
    return secrets.token_urlsafe(24)


@dataclass
class Secured:
    mesh: LocalMesh
    cp: ManagedProcess
    certs: Path
    client_tls: TLSFiles
    join_token: str
    admin_token: str
    acme_key: str
    globex_key: str
    wrong: str  # a wrong secret every check is also sent
    model: Path
    node_address: str = ""

    def tls_for(self, stem: str) -> TLSFiles:
        """``stem``'s certificate, dialling the control plane (its CA)."""
        return TLSFiles(
            self.certs / "controlplane-ca.crt",
            self.certs / f"{stem}.crt",
            self.certs / f"{stem}.key",
        )

    def secrets(self) -> list[str]:
        return [self.join_token, self.admin_token, self.acme_key, self.globex_key, self.wrong]


def _span_exporter() -> None:
    """Collect this process's spans (the SDK's) in memory, whichever test set the provider."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)  # once per process; later calls are ignored
        provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.add_span_processor(SimpleSpanProcessor(_SPANS))


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    from meshserve.devtools.certs import init_certs

    _span_exporter()
    work = tmp_path_factory.mktemp("secured")
    certs = work / "certs"
    init_certs(certs, nodes=["n1", "n2"])
    client_tls = TLSFiles(
        certs / "controlplane-ca.crt",
        certs / "client.crt",
        certs / "client.key",
        node_ca=certs / "node-ca.crt",
    )
    env = {**os.environ, "MESHSERVE_TRACE_CONSOLE": "1", "OTEL_TRACES_SAMPLER": "always_on"}
    mesh = LocalMesh(work, env=env, tls=client_tls)
    join_token, admin_token, acme_key, globex_key = _secret(), _secret(), _secret(), _secret()
    model = make_mlp(work / "mlp.onnx")
    (work / "join").write_text(f"# bootstrap tokens\n{join_token}\n")
    (work / "admin").write_text(admin_token + "\n")
    (work / "keys.yaml").write_text(
        "tenants:\n"
        f"  - {{name: acme, keys: [{acme_key}], models: [mlp]}}\n"
        f"  - {{name: globex, keys: [{globex_key}], models: [other]}}\n"
    )
    with mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane(
            "cp-1",
            extra=[
                "--tls-ca",
                str(certs / "controlplane-trust.crt"),
                "--tls-node-ca",
                str(certs / "node-ca.crt"),
                "--tls-cert",
                str(certs / "controlplane.crt"),
                "--tls-key",
                str(certs / "controlplane.key"),
                "--join-token-file",
                str(work / "join"),
                "--admin-token-file",
                str(work / "admin"),
                "--api-keys-file",
                str(work / "keys.yaml"),
            ],
        )
        mesh.start_node(
            "n1",
            [cp.address],
            direct=True,
            extra=[
                "--tls-ca",
                str(certs / "controlplane-ca.crt"),
                "--tls-client-ca",
                str(certs / "client-ca.crt"),
                "--tls-cert",
                str(certs / "node-n1.crt"),
                "--tls-key",
                str(certs / "node-n1.key"),
                "--join-token-file",
                str(work / "join"),
            ],
        )
        with AdminClient(cp.address, tls=client_tls, token=admin_token) as admin:
            nodes = wait_until(admin.list_nodes, 30, what="n1 to join")
            admin.register_model("mlp", model.as_uri(), sha256_file(model))
            wait_until(
                lambda: any(
                    c.state == mesh_pb2.READY for n in admin.list_nodes() for c in n.copies
                ),
                60,
                what="a READY copy of mlp",
            )
        s = Secured(
            mesh=mesh,
            cp=cp,
            certs=certs,
            client_tls=client_tls,
            join_token=join_token,
            admin_token=admin_token,
            acme_key=acme_key,
            globex_key=globex_key,
            wrong=_secret(),
            model=model,
            node_address=nodes[0].direct_address,
        )
        yield s


def test_certs_init_issues_a_working_chain(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshserve.client.cli",
            "certs",
            "init",
            str(tmp_path / "c"),
            "--node",
            "edge-7",
            "--host",
            "mesh.example",
            "--node-host",
            "edge-7.example",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "node-edge-7.crt" in proc.stdout and "wrote 13 files" in proc.stdout

    def load(stem: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((tmp_path / "c" / f"{stem}.crt").read_bytes())

    for stem, role in (
        ("controlplane", "controlplane"),
        ("node-edge-7", "node"),
        ("client", "client"),
    ):
        load(stem).verify_directly_issued_by(load(f"{role}-ca"))
        mode = stat.S_IMODE((tmp_path / "c" / f"{stem}.key").stat().st_mode)
        assert mode == 0o600, f"{stem}.key is {oct(mode)}"
    for stem in ("controlplane", "node-edge-7"):
        sans = load(stem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = set(sans.get_values_for_type(x509.DNSName))
        assert "localhost" in names
        # the control plane's name only on its own certificate, the nodes' only on theirs
        assert ("mesh.example" in names) == (stem == "controlplane")
        assert ("edge-7.example" in names) == (stem != "controlplane")
    again = subprocess.run(
        [sys.executable, "-m", "meshserve.client.cli", "certs", "init", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "exists" in again.stderr  # nothing overwritten


def test_query_over_mutual_tls_with_an_api_key(secured: Secured) -> None:
    with MeshClient(secured.cp.address, tls=secured.client_tls, api_key=secured.acme_key) as c:
        result = c.infer("mlp", {"x": X})
        assert c.model_ready("mlp")
        assert c.model_metadata("mlp").name == "mlp"
    np.testing.assert_allclose(result["y"], reference_outputs(secured.model, {"x": X})["y"], 1e-5)
    assert result.node == "n1"  # through the node's mTLS-only direct port (the gateway's cert)


def test_inference_needs_a_key_allowed_the_model(secured: Secured) -> None:
    address, tls = secured.cp.address, secured.client_tls
    for key in (None, secured.wrong):
        with MeshClient(address, tls=tls, api_key=key) as c:
            for call in (lambda: c.infer("mlp", {"x": X}), lambda: c.model_ready("mlp")):
                with pytest.raises(Unauthenticated):
                    call()
    with MeshClient(address, tls=tls, api_key=secured.globex_key) as c:
        for model in ("mlp", "no-such-model"):  # refused alike: no existence leak
            with pytest.raises(PermissionDenied, match="tenant 'globex' may not query"):
                c.infer(model, {"x": X})
            with pytest.raises(PermissionDenied):
                c.model_metadata(model)
    # The x-api-key header works too; on a stream each request's model is checked on its own.
    creds = channel_credentials(tls)
    assert creds is not None
    with grpc.secure_channel(address, creds) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        requests = [build_request("mlp", {"x": X}), build_request("other", {"x": X})]
        answers = list(
            stub.ModelStreamInfer(iter(requests), metadata=[("x-api-key", secured.acme_key)])
        )
        errors = sorted(a.error_message for a in answers)
        assert errors[0] == "" and errors[1].startswith("PERMISSION_DENIED")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(iter(requests), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_api_needs_the_admin_token(secured: Secured) -> None:
    for token in (None, secured.wrong, secured.acme_key):
        with AdminClient(secured.cp.address, tls=secured.client_tls, token=token) as admin:
            with pytest.raises(Unauthenticated):
                admin.list_models()
    with AdminClient(secured.cp.address, tls=secured.client_tls, token=secured.admin_token) as a:
        assert [m.name for m in a.list_models()] == ["mlp"]
    tls = [
        f"--tls-ca={secured.certs / 'controlplane-ca.crt'}",
        f"--tls-cert={secured.certs / 'client.crt'}",
        f"--tls-key={secured.certs / 'client.key'}",
    ]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    meshctl = [sys.executable, "-m", "meshserve.client.cli", *tls]
    listed = subprocess.run(
        [*meshctl, "nodes", "list", "-t", secured.cp.address],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "MESHSERVE_ADMIN_TOKEN": secured.admin_token},
    )
    assert listed.returncode == 0 and "n1" in listed.stdout, listed.stdout + listed.stderr
    refused = subprocess.run(
        [*meshctl, "nodes", "list", "-t", secured.cp.address],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def _connect(secured: Secured, cert: str, node_id: str, token: str | None) -> grpc.StatusCode:
    """Open NodeLink.Connect as node ``node_id`` with ``cert``; the status that ends it."""
    creds = channel_credentials(secured.tls_for(cert))
    assert creds is not None
    hello = mesh_pb2.NodeMessage(hello=mesh_pb2.Hello(node_id=node_id))
    metadata = [(JOIN_TOKEN_HEADER, token)] if token else None
    with grpc.secure_channel(secured.cp.address, creds) as channel:
        call = mesh_pb2_grpc.NodeLinkStub(channel).Connect(
            iter([hello]), metadata=metadata, timeout=10
        )
        try:
            for message in call:
                if message.HasField("welcome"):
                    return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.UNKNOWN


def test_nodes_need_the_join_token_and_their_own_certificate(secured: Secured) -> None:
    assert _connect(secured, "node-n2", "n2", None) == grpc.StatusCode.UNAUTHENTICATED
    assert _connect(secured, "node-n2", "n2", secured.wrong) == grpc.StatusCode.UNAUTHENTICATED
    # n2's certificate cannot claim n1's id (nor a new one), even with the right token
    assert (
        _connect(secured, "node-n2", "n1", secured.join_token) == grpc.StatusCode.PERMISSION_DENIED
    )
    assert (
        _connect(secured, "node-n2", "n3", secured.join_token) == grpc.StatusCode.PERMISSION_DENIED
    )
    with AdminClient(secured.cp.address, tls=secured.client_tls, token=secured.admin_token) as a:
        assert [n.node_id for n in a.list_nodes()] == ["n1"]  # never listed; n1 undisturbed


def test_only_the_node_ca_makes_node_certificates(secured: Secured) -> None:
    """The control plane's one listener admits clients' and replicas' certificates too
    (--tls-ca bundle); with --tls-node-ca only a certificate the node CA issued joins as a
    node, whatever its name (issue 16, finding 4)."""
    issue_from(secured.certs, "client", "n2", "client-named-n2")
    for stem, node_id in (("client-named-n2", "n2"), ("client", "client")):
        code = _connect(secured, stem, node_id, secured.join_token)
        assert code == grpc.StatusCode.PERMISSION_DENIED, stem
    with AdminClient(secured.cp.address, tls=secured.client_tls, token=secured.admin_token) as a:
        assert [n.node_id for n in a.list_nodes()] == ["n1"]


def test_plaintext_and_certificate_less_clients_are_refused(secured: Secured) -> None:
    for address, ca in (
        (secured.cp.address, "controlplane-ca.crt"),
        (secured.node_address, "node-ca.crt"),
    ):
        with MeshClient(address, timeout=3) as c, pytest.raises(StatusError) as err:
            c.model_ready("mlp")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        no_cert = TLSFiles(ca=secured.certs / ca)
        with MeshClient(address, timeout=3, tls=no_cert, api_key=secured.acme_key) as c:
            with pytest.raises(StatusError) as err:
                c.model_ready("mlp")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_no_secret_in_logs_or_spans(secured: Secured) -> None:
    """Last: stops the mesh (its processes flush their spans, printed to their logs)."""
    secured.mesh.close()
    logs = {p.name: p.log_path.read_text(errors="replace") for p in secured.mesh.processes}
    assert "gateway ModelInfer" in logs["cp-1"], "the control plane exported no span"
    assert '"meshserve.path": "direct"' in logs["cp-1"]
    spans = _SPANS.get_finished_spans()
    assert any(s.name == "client ModelInfer" for s in spans)
    exported = "\n".join(s.to_json() for s in spans)
    for secret in secured.secrets():
        for name, text in logs.items():
            assert secret not in text, f"a secret appears in the log of {name}"
        assert secret not in exported, "a secret appears in a span"
