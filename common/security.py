"""TLS files and bearer secrets → gRPC credentials: the one place all three deployables share.

Contract:

- :class:`TLSFiles` names PEM files: ``ca`` (the certificates a peer must chain to: the
  control-plane CA for what dials the control plane, a bundle of the callers' CAs for a control
  plane), ``cert`` and ``key`` (this process's own certificate chain and private key, always both
  or neither), ``node_ca`` (what a node's direct port must chain to, for a process that dials both
  kinds: the SDK; default ``ca``) and ``client_ca`` (a listener's extra callers: a node's direct
  port admits ``ca``, the routers, plus these). One CA per role is what lets a dialler know the
  kind of server it reached (see :mod:`meshserve.devtools.certs`). Files are read when
  credentials are built; a missing or unreadable file raises :class:`SecurityConfigError` naming
  the file (never its content).
- :func:`server_credentials`: a TLS listener; with ``require_client_cert`` the handshake fails for
  a client without a certificate chaining to ``ca`` or ``client_ca`` (gRPC Python cannot ask for
  an optional client certificate: it is required or not requested at all).
- :func:`channel_credentials`: what a client dials with. TLS when ``tls`` is given; a bearer
  ``token`` rides as ``authorization: Bearer <token>`` call credentials on every call. A token is
  only ever sent over TLS or, without TLS, to a loopback address (gRPC local credentials refuse
  any other peer), so a secret never crosses a network in the clear. None: plain insecure.
  :func:`load_cas` / :func:`issued_by`: which CA issued a verified peer certificate (a role check
  where one listener admits several roles' CAs).
  :func:`is_loopback_target` tells, from a target's text alone, whether it names a loopback
  address (``localhost``, ``127.x.x.x``, ``::1``): for a clear error before dialling.
- Secret files (:func:`read_secret`, :func:`read_secrets`) hold one secret per line; blank lines
  and ``#`` comments are skipped; errors name the file, never a secret.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from grpc import aio

__all__ = [
    "API_KEY_HEADER",
    "AUTHORIZATION_HEADER",
    "JOIN_TOKEN_HEADER",
    "ROUTER_KEY_HEADER",
    "SecurityConfigError",
    "TLSFiles",
    "aio_channel",
    "channel_credentials",
    "is_loopback_target",
    "issued_by",
    "load_cas",
    "read_secret",
    "read_secrets",
    "secret_matches",
    "server_credentials",
    "sync_channel",
]

#: Call metadata a node sends its join token in (NodeLink.Connect).
JOIN_TOKEN_HEADER: Final = "x-meshserve-join-token"
#: Call metadata carrying a tenant's API key (inference RPCs); ``authorization`` works too.
API_KEY_HEADER: Final = "x-api-key"
#: A replica's router key on its calls to nodes' direct ports (see meshserve.node.rights).
ROUTER_KEY_HEADER: Final = "x-meshserve-router"
#: ``authorization: Bearer <secret>``: the admin token, or an API key.
AUTHORIZATION_HEADER: Final = "authorization"


def secret_matches(secret: str | None, accepted: Iterable[str]) -> bool:
    """Whether ``secret`` is one of ``accepted``, in constant time in its content (every
    accepted value is compared, with ``hmac.compare_digest``); None matches nothing."""
    if secret is None:
        return False
    given = secret.encode()
    found = False
    for value in accepted:
        found |= hmac.compare_digest(given, value.encode())
    return found


class SecurityConfigError(ValueError):
    """A TLS or secret file is missing, unreadable, empty or inconsistent (message names the
    file and what is wrong, never a secret)."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class TLSFiles:
    """PEM file paths: ``ca`` to verify peers, ``cert``/``key`` to present (both or neither);
    ``node_ca``: nodes' direct ports (default ``ca``); ``client_ca``: a listener's extra callers."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    node_ca: Path | None = None
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key", "node_ca", "client_ca"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if (self.cert is None) != (self.key is None):
            raise SecurityConfigError("a TLS certificate and its key go together: give both")
        if self.ca is None and self.cert is None:
            raise SecurityConfigError("TLS needs a CA file, a certificate and key, or both")

    @classmethod
    def from_options(
        cls, ca: str | Path | None, cert: str | Path | None, key: str | Path | None
    ) -> TLSFiles | None:
        """From command-line options ("" and None mean absent); None when all are absent."""
        paths = [Path(p) if p else None for p in (ca, cert, key)]
        if all(p is None for p in paths):
            return None
        return cls(*paths)

    def ca_bytes(self) -> bytes | None:
        return None if self.ca is None else _read(self.ca, "TLS CA file")

    def callers_ca_bytes(self) -> bytes | None:
        """What a listener's callers may chain to: ``ca`` and ``client_ca``."""
        extra = None if self.client_ca is None else _read(self.client_ca, "TLS client CA file")
        ca = self.ca_bytes()
        if ca is None or extra is None:
            return ca or extra
        return ca.rstrip(b"\n") + b"\n" + extra

    def for_nodes(self) -> TLSFiles:
        """These files for dialling nodes' direct ports: ``node_ca`` as the CA, when given."""
        if self.node_ca is None:
            return self
        return TLSFiles(self.node_ca, self.cert, self.key)

    def pair(self) -> tuple[bytes, bytes] | None:
        """(private key, certificate chain), as gRPC takes them; None without a certificate."""
        if self.cert is None or self.key is None:
            return None
        return _read(self.key, "TLS key file"), _read(self.cert, "TLS certificate file")


def server_credentials(tls: TLSFiles, *, require_client_cert: bool) -> grpc.ServerCredentials:
    """Credentials of a TLS listener (see the module contract)."""
    pair = tls.pair()
    if pair is None:
        raise SecurityConfigError(
            "a TLS listener needs a certificate and key (--tls-cert/--tls-key)"
        )
    ca = tls.callers_ca_bytes()
    if require_client_cert and ca is None:
        raise SecurityConfigError("requiring client certificates needs a CA file (--tls-ca)")
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=require_client_cert
    )


def channel_credentials(
    tls: TLSFiles | None, token: str | None = None
) -> grpc.ChannelCredentials | None:
    """Credentials to dial with (see the module contract); None means an insecure channel."""
    if tls is None and not token:
        return None
    if tls is not None:
        pair = tls.pair()
        base = grpc.ssl_channel_credentials(
            root_certificates=tls.ca_bytes(),
            private_key=pair[0] if pair else None,
            certificate_chain=pair[1] if pair else None,
        )
    else:
        base = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    if not token:
        return base
    return grpc.composite_channel_credentials(base, grpc.access_token_call_credentials(token))


def load_cas(pem: bytes | None) -> tuple[x509.Certificate, ...]:
    """The certificates of a PEM bundle (a CA file); empty for None."""
    return tuple(x509.load_pem_x509_certificates(pem)) if pem else ()


def issued_by(pem: bytes, cas: Sequence[x509.Certificate]) -> bool:
    """Whether the certificate ``pem`` was signed directly by one of ``cas``."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return False
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def is_loopback_target(target: str) -> bool:
    """Whether ``target`` (``host:port``, ``[v6]:port``, optionally ``ipv4:``/``ipv6:``/
    ``dns:`` prefixed) names a loopback host: ``localhost`` or a loopback IP literal."""
    for scheme in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        host = target[1 : target.find("]")] if "]" in target else target[1:]
    elif target.count(":") == 1:
        host = target.rsplit(":", 1)[0]
    else:
        host = target  # no port, or a bare IPv6 address
    host = host.strip().rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def aio_channel(
    target: str,
    tls: TLSFiles | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> aio.Channel:
    """An asyncio channel to ``target``: insecure unless ``tls`` or ``token`` is given."""
    creds = channel_credentials(tls, token)
    if creds is None:
        return aio.insecure_channel(target, options=options)
    return aio.secure_channel(target, creds, options=options)


def sync_channel(
    target: str,
    tls: TLSFiles | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A blocking channel to ``target``: insecure unless ``tls`` or ``token`` is given."""
    creds = channel_credentials(tls, token)
    if creds is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, creds, options=options)


def read_secrets(path: Path, what: str = "secret file") -> list[str]:
    """Every secret in ``path`` (one per line; blank lines and ``#`` comments skipped)."""
    try:
        text = _read(path, what).decode()
    except UnicodeDecodeError:
        raise SecurityConfigError(f"{what} {path} is not UTF-8 text") from None
    secrets = [s for s in (line.strip() for line in text.splitlines()) if s and s[0] != "#"]
    if not secrets:
        raise SecurityConfigError(f"{what} {path} holds no secret (one per line)")
    return secrets


def read_secret(path: Path, what: str = "secret file") -> str:
    """The one secret in ``path`` (the first, if it holds several)."""
    return read_secrets(path, what)[0]
