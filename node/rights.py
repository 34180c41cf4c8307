"""Who may query this node's direct port: the tenant rights the control plane pushes.

A query that reaches a node's own port (``--listen``) directly, from an SDK that routes itself,
meets the rules it would meet at the gateway (:mod:`meshserve.controlplane.auth`): an API key
(``x-api-key: <key>`` or ``authorization: Bearer <key>`` metadata) of a tenant allowed the model.
The control plane sends a ``TenantRights`` down every node stream right after the Welcome (the
keys as SHA-256 digests, never the keys); :meth:`Rights.update` keeps the latest, whichever
replica sent it, across reconnects.

Decision, in this order:

1. A caller whose verified client certificate names a router of the mesh (:data:`ROUTERS`, the
   common name ``meshctl certs init`` issues to control-plane replicas and gateways) *and* was
   issued by a router CA (the node's ``--tls-ca``, the control-plane CA: a client CA's
   certificate never passes as a router, whatever its name) is let through: the router checked
   the tenant before forwarding (as for tunneled queries). So is a
   caller sending a replica's router key (metadata ``x-meshserve-router``) whose digest a
   replica sent with its rights (:data:`_ROUTER_KEYS_HELD` of them are kept: one per replica,
   a new one per replica restart): the mesh's own gateways without certificates.
2. Before any ``TenantRights`` has arrived the node cannot know the rules. A node started with
   TLS fails closed: UNAVAILABLE ("node X has not received its access rights from the control
   plane yet"; a router retries another copy, an SDK falls back to the gateway). A node without
   TLS is open until told otherwise (a development mesh; its port carries no secret anyway).
3. ``enforce`` false (the mesh has no API keys): open.
4. Otherwise no key, or a key whose digest no grant holds: UNAUTHENTICATED; a key whose tenant
   may not query the model: PERMISSION_DENIED (``tenant 'x' may not query model 'y'``), decided
   before the model is looked up (no existence leak). A client certificate alone is not enough.

Keys are looked up by their digest (a dict lookup on a hash leaks no timing about the key) and
never logged. A stream (ModelStreamInfer, the mux stream) is authenticated once
(:meth:`Rights.stream`); each of its queries is checked against the rights current when it
arrives, so a revoked key stops working on open streams too, and a stream opened while the node
was open is authenticated when enforced rights arrive. Health RPCs stay open.

Everything here but :meth:`Rights.stream_of` / :meth:`Rights.check_call` /
:meth:`Rights.peers_of` (which read a servicer context) is pure: a function of the rights held
and the caller's metadata.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509

from meshserve.common.errors import (
    PermissionDenied,
    ServicerContext,
    Unauthenticated,
    Unavailable,
)
from meshserve.common.security import (
    API_KEY_HEADER,
    AUTHORIZATION_HEADER,
    ROUTER_KEY_HEADER,
    issued_by,
)
from meshserve.common.tenancy import CALLER_KEY
from meshserve.protos import mesh_pb2

__all__ = ["ROUTERS", "Check", "Grant", "Rights", "api_key", "peer_names"]

#: Client certificate names of the mesh's routers (control-plane replicas, gateways).
ROUTERS: Final = frozenset({"controlplane"})

#: Client certificates whose issuer was checked, kept (PEM -> issued by a router CA).
_ISSUERS_HELD: Final = 256

#: Router key digests a node keeps (the newest; replicas restarting make new ones).
_ROUTER_KEYS_HELD: Final = 32

#: A stream's per-query check: raises for a model its caller may not query.
Check = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Grant:
    """One key's tenant and the models it may query (``*``: every model)."""

    tenant: str
    models: frozenset[str]

    def may_query(self, model: str) -> bool:
        return model in self.models or "*" in self.models


def api_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The API key in call metadata: ``x-api-key``, else ``authorization: Bearer <key>``."""
    bearer: str | None = None
    for key, value in metadata or ():
        if not isinstance(value, str):
            continue
        if key == API_KEY_HEADER:
            return value
        if key == AUTHORIZATION_HEADER and value[:7].lower() == "bearer ":
            bearer = value[7:].strip() or None
    return bearer


def _header(metadata: Iterable[tuple[str, str | bytes]] | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name and isinstance(value, str):
            return value
    return None


def peer_names(context: ServicerContext) -> tuple[str, ...]:
    """The names of the caller's verified client certificate: its common name, or (without
    one) its DNS subject alternative names; empty without a client certificate."""
    auth = context.auth_context()
    common = auth.get("x509_common_name") or auth.get("peer_dns") or ()
    return tuple(v.decode(errors="replace") for v in common)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Rights:
    """The latest TenantRights and the decisions made from them (see the module contract).

    ``fail_closed``: refuse every query until rights arrive (nodes started with TLS);
    ``routers``: the client certificate names let through unchecked, when the certificate was
    issued by one of ``router_cas`` (none: no certificate is a router's)."""

    def __init__(
        self,
        node_id: str,
        *,
        fail_closed: bool,
        routers: Collection[str] = ROUTERS,
        router_cas: Sequence[x509.Certificate] = (),
    ) -> None:
        self.node_id = node_id
        self.fail_closed = fail_closed
        self.routers = frozenset(routers)
        self.router_cas = tuple(router_cas)
        self._issuers: dict[bytes, bool] = {}  # client certificate PEM -> a router CA's
        self.received = False
        self.enforce = False
        self._grants: dict[bytes, Grant] = {}
        self._router_keys: dict[bytes, None] = {}  # digests, oldest first
        #: True while no query needs a check (the fast path: nothing looked up per query)
        self.open = not fail_closed

    def update(self, rights: mesh_pb2.TenantRights) -> None:
        """Hold ``rights`` from now on (the latest wins)."""
        self._grants = {
            bytes(g.key_sha256): Grant(g.tenant, frozenset(g.models)) for g in rights.grants
        }
        self.enforce = rights.enforce
        digest = bytes(rights.router_key_sha256)
        if digest:
            self._router_keys.pop(digest, None)
            self._router_keys[digest] = None
            while len(self._router_keys) > _ROUTER_KEYS_HELD:
                del self._router_keys[next(iter(self._router_keys))]
        self.received = True
        self.open = not rights.enforce

    # -- pure decisions ------------------------------------------------------------------------

    def _unknown(self) -> Unavailable:
        return Unavailable(
            f"node {self.node_id} has not received its access rights from the control plane "
            "yet; retry shortly or query through the gateway"
        )

    def stream(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, peers: Collection[str] = ()
    ) -> Check | None:
        """Authenticate a caller once: None when its queries need no check (open, or a
        router), else the per-model check (raising PERMISSION_DENIED, or UNAUTHENTICATED
        once its key is revoked); raises UNAUTHENTICATED / UNAVAILABLE (see the contract)."""
        if self.open or any(p in self.routers for p in peers):
            return None
        if not self.received:
            raise self._unknown()
        router = _header(metadata, ROUTER_KEY_HEADER)
        if router is not None and _digest(router) in self._router_keys:
            return None
        key = api_key(metadata)
        if key is None:
            raise Unauthenticated(
                f"node {self.node_id} needs an API key: metadata {API_KEY_HEADER!r} or "
                "'authorization: Bearer <key>' (a client certificate alone is not enough)"
            )
        digest = _digest(key)
        if digest not in self._grants:
            raise Unauthenticated("the API key is not valid")
        return lambda model: self._check_digest(digest, model)

    def _check_digest(self, digest: bytes, model: str) -> None:
        if self.open:  # the rights changed to open since the stream began
            return
        grant = self._grants.get(digest)
        if grant is None:
            raise Unauthenticated("the API key is not valid")
        if not grant.may_query(model):
            raise PermissionDenied(f"tenant {grant.tenant!r} may not query model {model!r}")

    def check(
        self,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        model: str,
        peers: Collection[str] = (),
    ) -> None:
        """One query: may this caller query ``model`` here? Raises the refusal's status."""
        check = self.stream(metadata, peers)
        if check is not None:
            check(model)

    # -- servicer hooks ------------------------------------------------------------------------

    def _router_issued(self, pem: bytes) -> bool:
        known = self._issuers.get(pem)
        if known is None:
            known = issued_by(pem, self.router_cas)
            if len(self._issuers) >= _ISSUERS_HELD:
                self._issuers.clear()
            self._issuers[pem] = known
        return known

    def peers_of(self, context: ServicerContext) -> tuple[str, ...]:
        """The caller's certificate names (:func:`peer_names`) when a router CA issued its
        certificate; else none (its names can make no router)."""
        names = peer_names(context)
        if not names:
            return ()
        pems = context.auth_context().get("x509_pem_cert") or ()
        return names if any(self._router_issued(p) for p in pems) else ()

    def stream_of(self, context: ServicerContext) -> Check | None:
        """:meth:`stream` for the caller of ``context`` (metadata and client certificate).

        A stream opened while the node is open gets a check that stays a no-op while it is
        open and authenticates the stream (once) if enforced rights arrive later: a stream
        opened before the rights is not exempt from them."""
        metadata = context.invocation_metadata()
        if not self.open:
            return self.stream(metadata, self.peers_of(context))  # type: ignore[arg-type]
        authenticated: list[Check | None] = []

        def later(model: str) -> None:
            if self.open:
                return
            if not authenticated:  # raises for this query (and the next) until it may
                authenticated.append(self.stream(metadata, self.peers_of(context)))  # type: ignore[arg-type]
            check = authenticated[0]
            if check is not None:
                check(model)

        return later

    def tenant_of(self, context: ServicerContext) -> str | None:
        """The tenant a direct caller's predictions are logged under (feedback joins only its
        own): its API key's tenant ("" without a valid one); None for a router, whose queries
        name their caller (:meth:`forwarded`). Nothing is looked up without grants."""
        if not self._grants:
            return ""
        metadata = context.invocation_metadata()
        router = _header(metadata, ROUTER_KEY_HEADER)  # type: ignore[arg-type]
        if router is not None and _digest(router) in self._router_keys:
            return None
        if any(p in self.routers for p in self.peers_of(context)):
            return None
        key = api_key(metadata)  # type: ignore[arg-type]
        grant = self._grants.get(_digest(key)) if key else None
        return grant.tenant if grant is not None else ""

    def forwarded(self, pairs: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The tenant a router's (or a tunneled) query names: the API key digest
        (:data:`~meshserve.common.tenancy.CALLER_KEY`) the router was given; "" unknown."""
        digest = _header(pairs, CALLER_KEY) if self._grants else None
        if not digest:
            return ""
        try:
            grant = self._grants.get(bytes.fromhex(digest))
        except ValueError:
            return ""
        return grant.tenant if grant is not None else ""

    def check_call(self, context: ServicerContext, model: str) -> None:
        """:meth:`check` for the caller of ``context``."""
        if self.open:
            return
        self.check(context.invocation_metadata(), model, self.peers_of(context))  # type: ignore[arg-type]
