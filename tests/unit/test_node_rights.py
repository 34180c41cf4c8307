"""The node's direct-port decisions (meshserve.node.rights): pure, from the rights held and the
caller's metadata and certificate names. The wording matches the gateway's (controlplane/auth)."""

from __future__ import annotations

import hashlib

import pytest

from meshserve.common.errors import PermissionDenied, Unauthenticated, Unavailable
from meshserve.common.security import issued_by, load_cas
from meshserve.controlplane.auth import AuthConfig, Guard, Tenant, Tenants
from meshserve.node.rights import Rights, api_key
from meshserve.protos import mesh_pb2
from tests.support.pki import issue_from

ACME = "acme-key-0123456789"
GLOBEX = "globex-key-0123456789"
ROOT = "root-key-0123456789"


def _pushed() -> mesh_pb2.TenantRights:
    """What a replica with these tenants pushes (Guard.tenant_rights)."""
    tenants = Tenants(
        [
            (Tenant("acme", frozenset({"mlp"})), [ACME]),
            (Tenant("globex", frozenset({"other"})), [GLOBEX]),
            (Tenant("root", frozenset({"*"})), [ROOT]),
        ]
    )
    return Guard(AuthConfig(tenants=tenants)).tenant_rights()


def _enforcing(fail_closed: bool = True) -> Rights:
    rights = Rights("n1", fail_closed=fail_closed)
    rights.update(_pushed())
    return rights


def test_the_key_comes_from_x_api_key_or_a_bearer_token() -> None:
    assert api_key([("x-api-key", ACME)]) == ACME
    assert api_key([("authorization", f"Bearer {ACME}")]) == ACME
    assert api_key([("authorization", f"bearer  {ACME} ")]) == ACME
    assert api_key([("authorization", f"Bearer {GLOBEX}"), ("x-api-key", ACME)]) == ACME
    assert api_key([("authorization", f"Basic {ACME}")]) is None
    assert api_key([("authorization", "Bearer ")]) is None
    assert api_key([("x-api-key-bin", b"\x00")]) is None
    assert api_key(None) is None


def test_before_any_rights_a_tls_node_fails_closed_and_an_insecure_one_is_open() -> None:
    closed = Rights("n1", fail_closed=True)
    assert not closed.open
    with pytest.raises(Unavailable, match="node n1 has not received its access rights"):
        closed.check([("x-api-key", ACME)], "mlp")
    with pytest.raises(Unavailable):
        closed.stream([])
    opened = Rights("n1", fail_closed=False)
    assert opened.open
    opened.check([], "mlp")
    assert opened.stream([]) is None


def test_a_mesh_without_api_keys_opens_every_node() -> None:
    for fail_closed in (True, False):
        rights = Rights("n1", fail_closed=fail_closed)
        rights.update(Guard(AuthConfig()).tenant_rights())
        assert rights.received and rights.open
        rights.check([], "anything")


def test_enforced_rights_need_a_valid_key_allowed_the_model() -> None:
    for fail_closed in (True, False):  # once told, TLS or not
        rights = _enforcing(fail_closed)
        rights.check([("x-api-key", ACME)], "mlp")
        rights.check([("authorization", f"Bearer {ROOT}")], "anything")
        with pytest.raises(PermissionDenied, match="tenant 'acme' may not query model 'other'"):
            rights.check([("x-api-key", ACME)], "other")
        with pytest.raises(PermissionDenied, match="tenant 'globex' may not query model 'mlp'"):
            rights.check([("x-api-key", GLOBEX)], "mlp")
        with pytest.raises(Unauthenticated, match="needs an API key"):
            rights.check([], "mlp")
        with pytest.raises(Unauthenticated, match="the API key is not valid"):
            rights.check([("x-api-key", "wrong-key-0123456789")], "mlp")


def test_a_client_certificate_alone_is_not_enough_but_a_router_is_trusted() -> None:
    rights = _enforcing()
    with pytest.raises(Unauthenticated):
        rights.check([], "mlp", peers=("client",))
    with pytest.raises(Unauthenticated):
        rights.check([], "mlp", peers=("n2",))  # another node's certificate
    rights.check([], "mlp", peers=("controlplane",))  # a gateway: it checked the tenant
    assert rights.stream([], ("controlplane",)) is None
    # a router is trusted even before the rights arrive (it checked already)
    Rights("n1", fail_closed=True).check([], "mlp", peers=("controlplane",))
    custom = Rights("n1", fail_closed=True, routers={"gw.example"})
    with pytest.raises(Unavailable):
        custom.check([], "mlp", peers=("controlplane",))
    custom.check([], "mlp", peers=("gw.example",))


def test_a_stream_is_authenticated_once_and_each_model_checked_against_current_rights() -> None:
    rights = _enforcing()
    with pytest.raises(Unauthenticated):
        rights.stream([("x-api-key", "wrong-key-0123456789")])
    check = rights.stream([("x-api-key", ACME)])
    assert check is not None
    check("mlp")
    with pytest.raises(PermissionDenied):
        check("other")
    # acme's key is revoked: the open stream stops working too
    revoked = _pushed()
    del revoked.grants[:]
    rights.update(revoked)
    with pytest.raises(Unauthenticated, match="not valid"):
        check("mlp")
    # the mesh drops its API keys: the open stream is let through
    rights.update(mesh_pb2.TenantRights(enforce=False))
    check("other")


def test_the_latest_rights_win() -> None:
    rights = _enforcing()
    rights.update(
        mesh_pb2.TenantRights(
            enforce=True,
            grants=[
                mesh_pb2.TenantGrant(key_sha256=hashlib.sha256(ACME.encode()).digest(), tenant="x")
            ],
        )
    )
    assert not rights.open
    with pytest.raises(PermissionDenied):
        rights.check([("x-api-key", ACME)], "mlp")


class _Context:
    """What Rights.stream_of reads of a servicer context: metadata and the certificate."""

    def __init__(
        self, metadata: list[tuple[str, str]], names: tuple[str, ...] = (), pem: bytes = b""
    ) -> None:
        self._metadata = metadata
        self._names = names
        self._pem = pem

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        if not self._names:
            return {}
        return {"x509_common_name": [n.encode() for n in self._names], "x509_pem_cert": [self._pem]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """PEMs: the control-plane CA, the router's (controlplane.crt) and client certificates, and
    a certificate named ``controlplane`` that the client CA issued."""
    from meshserve.devtools.certs import init_certs

    issued = init_certs(tmp_path_factory.mktemp("pki"))
    forged, _ = issue_from(issued.ca("client").parent, "client", "controlplane", "forged")
    return {
        "router_ca": issued.ca("controlplane").read_bytes(),
        "router": issued.controlplane[0].read_bytes(),
        "client": issued.client[0].read_bytes(),
        "forged": forged.read_bytes(),
    }


def test_a_stream_opened_before_the_rights_is_checked_once_they_arrive(
    pki: dict[str, bytes],
) -> None:
    rights = Rights("n1", fail_closed=False, router_cas=load_cas(pki["router_ca"]))
    anonymous = rights.stream_of(_Context([]))  # type: ignore[arg-type]
    keyed = rights.stream_of(_Context([("x-api-key", ACME)]))  # type: ignore[arg-type]
    router = rights.stream_of(_Context([], ("controlplane",), pki["router"]))  # type: ignore[arg-type]
    assert anonymous is not None and keyed is not None and router is not None
    anonymous("mlp")
    keyed("other")
    rights.update(_pushed())
    with pytest.raises(Unauthenticated):
        anonymous("mlp")
    keyed("mlp")
    with pytest.raises(PermissionDenied):
        keyed("other")
    router("other")  # a router stays trusted
    # a TLS node's stream after the rights: authenticated at once
    with pytest.raises(Unauthenticated):
        rights.stream_of(_Context([("x-api-key", "wrong-key-0123456789")]))  # type: ignore[arg-type]
    assert rights.stream_of(_Context([], ("controlplane",), pki["router"])) is None  # type: ignore[arg-type]


def test_only_a_router_cas_certificate_passes_as_a_router(pki: dict[str, bytes]) -> None:
    """A certificate's name makes a router only when the router (control-plane) CA issued it:
    the client CA's certificate named ``controlplane`` needs a key like any client."""
    cas = load_cas(pki["router_ca"])
    assert issued_by(pki["router"], cas)
    assert not issued_by(pki["forged"], cas) and not issued_by(pki["client"], cas)
    assert not issued_by(b"not a certificate", cas) and not issued_by(pki["router"], ())
    rights = Rights("n1", fail_closed=True, router_cas=cas)
    rights.update(_pushed())
    rights.check_call(_Context([], ("controlplane",), pki["router"]), "other")  # type: ignore[arg-type]
    for pem in (pki["forged"], pki["client"]):
        context = _Context([], ("controlplane",), pem)
        with pytest.raises(Unauthenticated, match="a client certificate alone is not enough"):
            rights.check_call(context, "mlp")  # type: ignore[arg-type]
        with pytest.raises(PermissionDenied):
            rights.check_call(_Context([("x-api-key", ACME)], ("controlplane",), pem), "other")  # type: ignore[arg-type]
    no_cas = Rights("n1", fail_closed=True)  # no router CA known: no certificate is a router's
    no_cas.update(_pushed())
    with pytest.raises(Unauthenticated):
        no_cas.check_call(_Context([], ("controlplane",), pki["router"]), "mlp")  # type: ignore[arg-type]


def test_a_replicas_router_key_lets_its_gateway_through_and_nothing_else_does() -> None:
    """Without certificates (API keys on an insecure mesh), a replica's gateway authenticates
    to nodes with its router key; the node was told only its digest."""
    tenants = Tenants([(Tenant("acme", frozenset({"mlp"})), [ACME])])
    guard = Guard(AuthConfig(tenants=tenants))
    rights = Rights("n1", fail_closed=False)
    rights.update(guard.tenant_rights())
    rights.check(guard.router_metadata, "any-model")  # a router: no tenant check
    assert rights.stream(guard.router_metadata) is None
    ((header, key),) = guard.router_metadata
    assert key.encode() not in guard.tenant_rights().SerializeToString()  # only its digest
    with pytest.raises(Unauthenticated):
        rights.check([(header, key + "x")], "mlp")
    other = Guard(AuthConfig(tenants=tenants))  # another replica: its key is its own
    with pytest.raises(Unauthenticated):
        rights.check(other.router_metadata, "mlp")
    rights.update(other.tenant_rights())  # told by that replica too: both are kept
    assert not rights.open
    rights.check(other.router_metadata, "mlp")
    rights.check(guard.router_metadata, "mlp")
