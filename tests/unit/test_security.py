"""The pure parts of security: certificates, TLS file checks, secret files, the API keys file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from meshserve.common.security import (
    SecurityConfigError,
    TLSFiles,
    channel_credentials,
    is_loopback_target,
    read_secrets,
)
from meshserve.controlplane.auth import AuthConfig, Guard, Tenant, load_api_keys
from meshserve.devtools.certs import init_certs
from meshserve.node.link import PlaintextJoinRefused, link_credentials

KEY_A = "a" * 20
KEY_B = "b-secret-key-0123456789"


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_chain_to_their_role_ca_and_name_their_node(tmp_path: Path) -> None:
    issued = init_certs(tmp_path, nodes=["edge-1"], hosts=["cp.example"], node_hosts=["10.0.0.5"])
    cert_path = issued.nodes["edge-1"][0]
    cert = _load(cert_path)
    cert.verify_directly_issued_by(_load(issued.ca("node")))
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "edge-1"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "edge-1" in sans.get_values_for_type(x509.DNSName)
    assert "cp.example" not in sans.get_values_for_type(x509.DNSName)  # never a CP name
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
        "10.0.0.5",
    ]
    cp = _load(issued.controlplane[0])
    cp.verify_directly_issued_by(_load(issued.ca("controlplane")))
    cp_sans = cp.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "cp.example" in cp_sans.get_values_for_type(x509.DNSName)
    _load(issued.client[0]).verify_directly_issued_by(_load(issued.ca("client")))
    # one CA per role: a node's or a client's certificate does not chain to the CP's CA
    for other in (cert_path, issued.client[0]):
        with pytest.raises(ValueError):
            _load(other).verify_directly_issued_by(_load(issued.ca("controlplane")))
    bundle = x509.load_pem_x509_certificates(issued.controlplane_trust.read_bytes())
    assert {c.subject for c in bundle} == {_load(issued.ca(r)).subject for r in issued.cas}
    for path in issued.all():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644), path
    with pytest.raises(FileExistsError):
        init_certs(tmp_path)
    init_certs(tmp_path, force=True)


def test_a_control_plane_name_is_never_put_on_a_node_certificate(tmp_path: Path) -> None:
    for hosts, node_hosts, nodes in (
        (["mesh.example"], ["mesh.example"], ["n1"]),
        (["mesh.example"], [], ["mesh.example"]),
    ):
        with pytest.raises(ValueError, match=r"mesh\.example: a control-plane name"):
            init_certs(tmp_path, hosts=hosts, node_hosts=node_hosts, nodes=nodes)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_tls_files_for_nodes_and_a_listeners_callers(tmp_path: Path) -> None:
    issued = init_certs(tmp_path, nodes=["n1"])
    cp_ca, node_ca, client_ca = (issued.ca(r) for r in ("controlplane", "node", "client"))
    sdk = TLSFiles(cp_ca, *issued.client, node_ca=node_ca)
    assert sdk.for_nodes() == TLSFiles(node_ca, *issued.client)
    assert TLSFiles(cp_ca).for_nodes() == TLSFiles(cp_ca)  # default: the same CA
    listener = TLSFiles(cp_ca, *issued.nodes["n1"], client_ca=client_ca)
    both = x509.load_pem_x509_certificates(listener.callers_ca_bytes() or b"")
    assert [c.subject for c in both] == [_load(cp_ca).subject, _load(client_ca).subject]
    assert TLSFiles(cp_ca).callers_ca_bytes() == cp_ca.read_bytes()


def test_tls_files_need_a_cert_with_its_key_and_name_missing_files(tmp_path: Path) -> None:
    assert TLSFiles.from_options("", None, "") is None
    with pytest.raises(SecurityConfigError, match="go together"):
        TLSFiles.from_options(None, tmp_path / "c.crt", None)
    files = TLSFiles(ca=tmp_path / "missing.crt")
    with pytest.raises(SecurityConfigError, match=r"missing\.crt"):
        files.ca_bytes()
    assert channel_credentials(None) is None
    assert channel_credentials(None, "token") is not None  # loopback-only local credentials


def test_secret_files_skip_comments_and_refuse_empty(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\n\n  one  \ntwo\n")
    assert read_secrets(path) == ["one", "two"]
    path.write_text("# nothing\n")
    with pytest.raises(SecurityConfigError, match="holds no secret"):
        read_secrets(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tenants: []", "tenants"),
        (f"tenants: [{{name: a, keys: [{KEY_A}]}}]", "models"),
        ("tenants: [{name: a, keys: [short-key], models: [m]}]", "at least 16 characters"),
        (
            f"tenants: [{{name: a, keys: [{KEY_A}], models: [m]}}, "
            f"{{name: b, keys: [{KEY_A}], models: [m]}}]",
            "share an API key",
        ),
        (
            f"tenants: [{{name: a, keys: [{KEY_A}], models: [m]}}, "
            f"{{name: a, keys: [{KEY_B}], models: [m]}}]",
            "unique",
        ),
        (f"tenants: [{{name: a, keys: [{KEY_A}], models: [m], extra: 1}}]", "extra"),
        (f"tenants: [{{name: a, keys: [{KEY_A}]", "not valid YAML"),
    ],
)
def test_a_bad_api_keys_file_is_named_without_echoing_keys(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(SecurityConfigError) as err:
        load_api_keys(path)
    message = str(err.value)
    assert str(path) in message and problem in message
    assert KEY_A not in message and KEY_B not in message and "short-key" not in message


def test_api_keys_find_their_tenant_and_its_models(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"tenants:\n  - {{name: a, keys: [{KEY_A}], models: [m1]}}\n"
        f"  - {{name: b, keys: [{KEY_B}], models: ['*']}}\n"
    )
    tenants = load_api_keys(path)
    a, b = tenants.find(KEY_A), tenants.find(KEY_B)
    assert a == Tenant("a", frozenset({"m1"})) and b is not None
    assert a.may_query("m1") and not a.may_query("m2") and b.may_query("anything")
    assert tenants.find("x" * 20) is None
    assert KEY_A not in repr(tenants) and KEY_A not in repr(AuthConfig(tenants=tenants))
    assert "tok-secret" not in repr(AuthConfig(join_tokens=("tok-secret",), admin_token="tok"))


def test_an_unconfigured_guard_wraps_nothing() -> None:
    class Servicer:
        async def ModelInfer(self, request: object, context: object) -> None:
            return None

    servicer = Servicer()
    method = servicer.ModelInfer
    guard = Guard(AuthConfig())
    assert guard.inference(servicer).ModelInfer == method
    assert guard.admin(servicer).ModelInfer == method
    assert guard.node_link(servicer) is servicer
    assert guard.identify_node is None and guard.stream_check is None


def test_loopback_targets_are_told_by_their_text() -> None:
    for target in ("127.0.0.1:7000", "localhost:1", "[::1]:5", "ipv4:127.0.0.2:9", "::1"):
        assert is_loopback_target(target), target
    for target in ("10.0.0.1:7", "cp.example:7000", "0.0.0.0:1", "[fe80::1]:3", "127.example:1"):
        assert not is_loopback_target(target), target


def test_a_join_token_goes_in_the_clear_to_loopback_only() -> None:
    """The node link's guard (issue 16 finding 14): no TLS + a join token + a remote replica is
    refused unless --insecure-join; loopback ones get gRPC local credentials (loopback peers
    only, whatever a name resolves to)."""
    with pytest.raises(PlaintextJoinRefused, match=r"10\.0\.0\.5:7000 in the clear"):
        link_credentials("10.0.0.5:7000", None, join_token=True)
    assert link_credentials("10.0.0.5:7000", None, join_token=True, insecure_join=True) is None
    assert link_credentials("10.0.0.5:7000", None, join_token=False) is None  # nothing secret
    assert link_credentials("127.0.0.1:7000", None, join_token=True) is not None
    tls = channel_credentials(TLSFiles(ca=Path(__file__)))  # any readable file will do here
    assert link_credentials("10.0.0.5:7000", tls, join_token=True) is tls
