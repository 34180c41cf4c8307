"""Who may call the control plane: join tokens, node identity, the admin token, tenant API keys.

Every check of a control-plane replica lives here, applied in one of two ways:

- at registration, like :func:`meshserve.common.errors.map_errors` (and before it, so a refusal
becomes its
  status): :meth:`Guard.node_link` (join token on ``NodeLink.Connect``, checked before the stream
  reaches the hub), :meth:`Guard.admin` (every Admin RPC), :meth:`Guard.inference` (ModelInfer,
  ModelMetadata, ModelReady, ModelConfig; RepositoryIndex lists only the tenant's models);
- as hooks the servicer calls where only it has the data: :meth:`Guard.identify_node` (the hub,
  once the Hello names the node) and :meth:`Guard.stream_check` (the gateway's ModelStreamInfer,
  whose requests each name a model).

A guard with nothing configured wraps nothing and returns None hooks: zero per-request cost.

Contract of every check: a missing or wrong credential is UNAUTHENTICATED; a known caller asking
for what it may not have is PERMISSION_DENIED, decided before anything is looked up (no model
existence leak). Secrets are compared in constant time (``hmac.compare_digest``; API keys are
looked up by their SHA-256 digest) and never appear in a message, a log line or a span.

Metadata: ``x-meshserve-join-token`` (nodes), ``authorization: Bearer <admin token>`` (Admin API),
``x-api-key: <key>`` or ``authorization: Bearer <key>`` (inference; Admin ``Feedback`` also accepts
a key allowed to query the model it reports on). Health RPCs (ServerLive, ServerReady,
ServerMetadata) stay open for probes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshserve.common.errors import Malformed, PermissionDenied, ServicerContext, Unauthenticated
from meshserve.common.security import (
    API_KEY_HEADER,
    AUTHORIZATION_HEADER,
    JOIN_TOKEN_HEADER,
    ROUTER_KEY_HEADER,
    SecurityConfigError,
    issued_by,
    secret_matches,
)
from meshserve.protos import mesh_pb2

__all__ = ["AuthConfig", "Guard", "Tenant", "Tenants", "load_api_keys"]

_log = logging.getLogger("meshserve.controlplane.auth")
S = TypeVar("S")
Handler = Callable[[Any, ServicerContext], Awaitable[Any]]
#: RPCs of the inference service that name a model (field ``model_name`` or ``name``).
_MODEL_RPCS = ("ModelInfer", "ModelMetadata", "ModelReady", "ModelConfig")


# -- tenants and their keys ---------------------------------------------------------------------


class _TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    keys: list[str] = Field(min_length=1)
    models: list[str] = Field(min_length=1)

    @field_validator("keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if len(key.strip()) < 16 or key != key.strip():
                # never echo the key: the message would end up in a terminal or a log
                raise ValueError("every key must be at least 16 characters, without spaces")
        return keys


class _ApiKeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: list[_TenantSpec] = Field(min_length=1)


@dataclass(frozen=True)
class Tenant:
    """A tenant: its name and the models its keys may query (``*``: every model)."""

    name: str
    models: frozenset[str]

    def may_query(self, model: str) -> bool:
        return model in self.models or "*" in self.models


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Tenants:
    """API keys → tenants. Keys are kept only as SHA-256 digests (a lookup by digest leaks no
    timing about the key; a memory dump shows no key)."""

    def __init__(self, tenants: Iterable[tuple[Tenant, Sequence[str]]]) -> None:
        self._by_digest: dict[bytes, Tenant] = {}
        for tenant, keys in tenants:
            for key in keys:
                other = self._by_digest.setdefault(_digest(key), tenant)
                if other is not tenant:
                    raise SecurityConfigError(
                        f"tenants {other.name!r} and {tenant.name!r} share an API key"
                    )
        self.names = sorted({t.name for t in self._by_digest.values()})

    def find(self, key: str) -> Tenant | None:
        return self._by_digest.get(_digest(key))

    def rights(self) -> mesh_pb2.TenantRights:
        """Every key's digest and its tenant's models: what a node enforces on its direct port
        (the keys themselves never leave the replica)."""
        return mesh_pb2.TenantRights(
            enforce=True,
            grants=[
                mesh_pb2.TenantGrant(key_sha256=digest, tenant=t.name, models=sorted(t.models))
                for digest, t in sorted(self._by_digest.items())
            ],
        )

    def __repr__(self) -> str:
        return f"Tenants({', '.join(self.names)})"


def load_api_keys(path: Path) -> Tenants:
    """Parse an API keys file (YAML)::

        tenants:
          - name: acme
            keys: ["<at least 16 characters>"]
            models: [digits, demo-mlp]     # "*" for every model

    Raises :class:`SecurityConfigError` naming the file and each problem (never a key)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SecurityConfigError(f"cannot read API keys file {path}: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        # YAML errors quote the offending line, which may hold a key
        raise SecurityConfigError(f"API keys file {path} is not valid YAML") from None
    try:
        parsed = _ApiKeysFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise SecurityConfigError(f"API keys file {path}: {problems}") from None
    names = [t.name for t in parsed.tenants]
    if len(set(names)) != len(names):
        raise SecurityConfigError(f"API keys file {path}: tenant names must be unique")
    try:
        return Tenants((Tenant(t.name, frozenset(t.models)), t.keys) for t in parsed.tenants)
    except SecurityConfigError as exc:
        raise SecurityConfigError(f"API keys file {path}: {exc}") from None


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthConfig:
    """What a replica checks (parsed from files in ``main()``; secrets hidden from ``repr``).

    ``join_tokens``: a node must send one of them (empty: no check). ``admin_token``: every
    Admin RPC needs it (None: open). ``tenants``: inference needs an API key (None: open)."""

    join_tokens: tuple[str, ...] = field(default=(), repr=False)
    admin_token: str | None = field(default=None, repr=False)
    #: read-only: opens the live map (observe/ui) only, never the Admin API
    viewer_token: str | None = field(default=None, repr=False)
    tenants: Tenants | None = None


# -- metadata -----------------------------------------------------------------------------------


def _metadata(context: ServicerContext, key: str) -> str | None:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key and isinstance(value, str):
            return value
    return None


def _bearer(context: ServicerContext) -> str | None:
    value = _metadata(context, AUTHORIZATION_HEADER)
    if value is None or value[:7].lower() != "bearer ":
        return None
    return value[7:].strip() or None


def _model_of(request: Any) -> str:
    name = getattr(request, "model_name", None)
    if name is None:
        name = getattr(request, "name", "")
    return str(name)


def _refused(context: ServicerContext, reason: str) -> None:
    """Log a refused node stream: who and why (never the secret it sent)."""
    _log.warning("node stream from %s refused: %s", context.peer(), reason)


def _rpc_names(servicer: object) -> list[str]:
    """The RPC names of ``servicer`` (those its generated base class defines)."""
    return sorted(
        {
            name
            for klass in type(servicer).__mro__
            if klass.__module__.endswith("_pb2_grpc")
            for name in vars(klass)
            if not name.startswith("_")
        }
    )


class Guard:
    """The replica's auth checks (see the module contract). ``verify_node_identity``: a node's
    client certificate must name its node id (a listener that requires client certificates);
    ``node_cas``: and be issued directly by one of these CAs (``--tls-node-ca``: the one
    listener also admits clients' certificates, which must never pass as a node's)."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        verify_node_identity: bool = False,
        node_cas: Sequence[x509.Certificate] = (),
    ) -> None:
        self.config = config
        self.verify_node_identity = verify_node_identity
        self.node_cas = tuple(node_cas)
        # This replica's router key: its gateway's calls to nodes' direct ports carry it, and
        # nodes enforcing tenant rights let them through (they are told its digest only).
        self._router_key = secrets.token_urlsafe(32)

    @property
    def router_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata this replica's gateway sends on every call to a node's direct port."""
        return ((ROUTER_KEY_HEADER, self._router_key),)

    # -- credentials ---------------------------------------------------------------------------

    def tenant(self, context: ServicerContext) -> Tenant:
        """The caller's tenant from its API key; UNAUTHENTICATED without a valid one."""
        assert self.config.tenants is not None
        key = _metadata(context, API_KEY_HEADER) or _bearer(context)
        if key is None:
            raise Unauthenticated(
                f"this gateway needs an API key: metadata {API_KEY_HEADER!r} or "
                "'authorization: Bearer <key>'"
            )
        tenant = self.config.tenants.find(key)
        if tenant is None:
            raise Unauthenticated("the API key is not valid")
        return tenant

    def check_model(self, tenant: Tenant, model: str) -> None:
        if not tenant.may_query(model):
            raise PermissionDenied(f"tenant {tenant.name!r} may not query model {model!r}")

    def check_admin(self, context: ServicerContext, request: Any = None) -> None:
        """The admin token, or (for Feedback, ``request`` given) a key allowed the model, whose
        tenant the request then names."""
        token = self.config.admin_token
        assert token is not None
        given = _bearer(context)
        if secret_matches(given, (token,)):
            return
        if request is not None and self.config.tenants is not None:
            key = _metadata(context, API_KEY_HEADER) or given
            tenant = self.config.tenants.find(key) if key else None
            if tenant is not None:
                self.check_model(tenant, str(request.model))
                request.tenant = tenant.name  # its feedback joins only its own queries
                return
        if given is None:
            raise Unauthenticated(
                "the Admin API needs 'authorization: Bearer <admin token>' metadata "
                "(meshctl --admin-token-file)"
            )
        raise Unauthenticated("the admin token is not valid")

    def check_join_token(self, context: ServicerContext) -> None:
        given = _metadata(context, JOIN_TOKEN_HEADER)
        if given is None:
            _refused(context, "no join token")
            raise Unauthenticated(
                f"this control plane admits nodes with a join token (metadata "
                f"{JOIN_TOKEN_HEADER!r}; node --join-token-file)"
            )
        if not secret_matches(given, self.config.join_tokens):
            _refused(context, "a wrong join token")
            raise Unauthenticated("the join token is not valid")

    # -- hooks ----------------------------------------------------------------------------------

    def tenant_rights(self) -> mesh_pb2.TenantRights:
        """What nodes enforce on their direct ports (pushed down every node stream): the
        tenants' key digests and models, or ``enforce=False`` when no API keys are configured."""
        tenants = self.config.tenants
        rights = mesh_pb2.TenantRights(enforce=False) if tenants is None else tenants.rights()
        rights.router_key_sha256 = _digest(self._router_key)
        return rights

    def feed_filter(self, context: ServicerContext) -> Callable[[str], bool] | None:
        """For the routing feed: which models the caller may see (None: every model, no API
        keys configured); UNAUTHENTICATED without a valid key."""
        if self.config.tenants is None:
            return None
        return self.tenant(context).may_query

    @property
    def identify_node(self) -> Callable[[ServicerContext, str], None] | None:
        """The hub's check of a node's claimed id, or None when identities are not verified."""
        return self._identify if self.verify_node_identity else None

    def _identify(self, context: ServicerContext, node_id: str) -> None:
        """The client certificate must name ``node_id``: its common name, or (a certificate
        without one) one of its DNS subject alternative names; and, with ``node_cas``, be one
        of theirs."""
        auth = context.auth_context()
        common = [v.decode(errors="replace") for v in auth.get("x509_common_name", [])]
        names = common or [v.decode(errors="replace") for v in auth.get("peer_dns", [])]
        if not names:
            _refused(context, f"no client certificate for node {node_id!r}")
            raise Unauthenticated(f"node {node_id}: no client certificate identifies it")
        if node_id not in names:
            message = f"the client certificate is for {', '.join(sorted(names))}, not {node_id!r}"
            _refused(context, message)
            raise PermissionDenied(message)
        pems = auth.get("x509_pem_cert") or ()
        if self.node_cas and not any(issued_by(p, self.node_cas) for p in pems):
            message = f"the client certificate for {node_id!r} is not a node's (--tls-node-ca)"
            _refused(context, message)
            raise PermissionDenied(message)

    @property
    def tenant_name(self) -> Callable[[ServicerContext], str] | None:
        """For the gateway's admission: the caller's tenant name (its per-client limits count
        per tenant, not per the ``x-client-id`` it chooses); None when no API keys are
        configured."""
        if self.config.tenants is None:
            return None
        return lambda context: self.tenant(context).name

    @property
    def stream_check(self) -> Callable[[ServicerContext], Callable[[str], None]] | None:
        """For ModelStreamInfer: ``check(context)`` authenticates the stream (raising
        UNAUTHENTICATED) and returns the per-request model check (raising PERMISSION_DENIED);
        None when no API keys are configured."""
        if self.config.tenants is None:
            return None

        def check(context: ServicerContext) -> Callable[[str], None]:
            return functools.partial(self.check_model, self.tenant(context))

        return check

    # -- registration ---------------------------------------------------------------------------

    def node_link(self, servicer: S) -> S:
        """Check the join token before ``Connect`` runs (when join tokens are configured)."""
        if self.config.join_tokens:
            self._wrap(servicer, ["Connect"], self._join_checked)
        return servicer

    def admin(self, servicer: S) -> S:
        """Require the admin token on every RPC of ``servicer`` (when one is configured). A
        Feedback sent with a tenant's API key names that tenant (its feedback joins only its own
        queries), with or without an admin token."""
        if self.config.admin_token is not None:
            self._wrap(servicer, _rpc_names(servicer), self._admin_checked)
        elif self.config.tenants is not None:
            self._wrap(servicer, ("Feedback",), self._feedback_scoped)
        return servicer

    def _feedback_scoped(self, behavior: Handler, name: str) -> Handler:
        """An open Admin API with API keys: a Feedback sent with a key names its tenant."""

        async def handler(request: Any, context: ServicerContext) -> Any:
            assert self.config.tenants is not None
            key = _metadata(context, API_KEY_HEADER) or _bearer(context)
            tenant = self.config.tenants.find(key) if key else None
            if tenant is not None and not isinstance(request, Malformed):
                request.tenant = tenant.name
            return await behavior(request, context)

        return handler

    def inference(self, servicer: S) -> S:
        """Require an API key allowed the model on ModelInfer/ModelMetadata/ModelReady (when
        keys are configured); ModelStreamInfer checks through :attr:`stream_check`."""
        if self.config.tenants is not None:
            self._wrap(servicer, _MODEL_RPCS, self._tenant_checked)
            self._wrap(servicer, ("RepositoryIndex",), self._index_scoped)
        return servicer

    def _index_scoped(self, behavior: Handler, name: str) -> Handler:
        """Triton's RepositoryIndex with API keys: only the models the caller's tenant may query
        (UNAUTHENTICATED without a valid key)."""

        async def handler(request: Any, context: ServicerContext) -> Any:
            tenant = self.tenant(context)
            response = await behavior(request, context)
            kept = [m for m in response.models if tenant.may_query(m.name)]
            del response.models[:]
            response.models.extend(kept)
            return response

        return handler

    @staticmethod
    def _wrap(
        servicer: object, names: Iterable[str], wrapper: Callable[[Handler, str], Handler]
    ) -> None:
        for name in names:
            method = getattr(servicer, name, None)
            if method is not None and inspect.iscoroutinefunction(method):
                setattr(servicer, name, wrapper(method, name))

    def _join_checked(self, behavior: Handler, name: str) -> Handler:
        async def handler(request: Any, context: ServicerContext) -> Any:
            self.check_join_token(context)
            return await behavior(request, context)

        return handler

    def _admin_checked(self, behavior: Handler, name: str) -> Handler:
        feedback = name == "Feedback"

        async def handler(request: Any, context: ServicerContext) -> Any:
            checked = request if feedback and not isinstance(request, Malformed) else None
            self.check_admin(context, checked)
            return await behavior(request, context)

        return handler

    def _tenant_checked(self, behavior: Handler, name: str) -> Handler:
        async def handler(request: Any, context: ServicerContext) -> Any:
            tenant = self.tenant(context)
            if not isinstance(request, Malformed):
                self.check_model(tenant, _model_of(request))
            return await behavior(request, context)

        return handler
