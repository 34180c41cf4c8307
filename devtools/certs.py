"""A development PKI for a mutual-TLS mesh (``meshctl certs init``): one CA per role.

A process verifies a peer by the CA it chains to, so each role has its own CA and each process
trusts only the CAs of the roles it talks to (gRPC Python runs no custom verify callback on the
client side: separate trust anchors are how a dialler knows the *kind* of server it reached).
A stolen node key can therefore never pass as the control plane, nor a client certificate as a
router.

Contract: :func:`init_certs` creates ``DIR`` (if needed) and writes, as PEM files,

- ``controlplane-ca.crt`` / ``.key``, ``node-ca.crt`` / ``.key``, ``client-ca.crt`` / ``.key``:
  three self-signed CAs, one per role;
- ``controlplane.crt`` / ``.key`` (control-plane CA): CN ``controlplane``, SANs ``localhost``,
  ``127.0.0.1``, ``::1`` and every ``hosts`` entry; server use (the CP listener) and client use
  (the gateway dialling nodes' direct ports);
- ``node-<id>.crt`` / ``.key`` per node id (node CA): CN and a DNS SAN equal to the node id (the
  control plane checks a node's claimed id against them), plus the loopback SANs and
  ``node_hosts`` (the node's own direct OIP port) — never ``hosts``; server and client use;
- ``client.crt`` / ``.key`` (client CA): CN ``client``, client use only (SDK, meshctl);
- ``controlplane-trust.crt``: the node, client and control-plane CAs in one bundle, the control
  plane's ``--tls-ca`` (who may call it; what a node's direct port must chain to).

Who trusts what: everything that dials the control plane (nodes' ``--tls-ca``, meshctl, the
SDK's gateway channel) trusts ``controlplane-ca.crt`` only; what dials a node's direct port trusts
``node-ca.crt`` (the SDK's ``TLSFiles(node_ca=...)``); a node's port admits the control-plane CA
(the routers) and, with ``--tls-client-ca client-ca.crt``, clients.

Private keys are written with mode 0600 (created so, never world-readable for a moment); an
existing file is never overwritten unless ``force``. Keys are ECDSA P-256; certificates last
``days`` days. For development and tests: production meshes should use their own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ROLES", "IssuedFiles", "init_certs"]

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


#: The roles, each with its own CA.
ROLES: Final = ("controlplane", "node", "client")


@dataclass(frozen=True)
class IssuedFiles:
    """What :func:`init_certs` wrote (paths), by role."""

    cas: dict[str, tuple[Path, Path]]  # role -> (CA certificate, CA key)
    controlplane: tuple[Path, Path]
    nodes: dict[str, tuple[Path, Path]]
    client: tuple[Path, Path]
    controlplane_trust: Path  # the control plane's --tls-ca bundle

    def ca(self, role: str) -> Path:
        """The CA certificate of ``role`` (``controlplane``, ``node``, ``client``)."""
        return self.cas[role][0]

    def all(self) -> list[Path]:
        out = [p for pair in self.cas.values() for p in pair]
        out.extend(self.controlplane)
        for pair in self.nodes.values():
            out.extend(pair)
        out.extend(self.client)
        out.append(self.controlplane_trust)
        return out


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshserve"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _sans(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    days: int,
    ca: bool = False,
    sans: Sequence[str] = (),
    server: bool = False,
    client: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    usage = x509.KeyUsage(  # a CA signs certificates; a leaf agrees keys (ECDHE) and signs
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    if not ca:
        purposes = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        purposes += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        builder = builder.add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    builder = builder.add_extension(usage, critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_sans(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass force to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # an existing file (force) keeps its old mode otherwise


def _save(
    directory: Path,
    stem: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    force: bool,
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_pem, 0o600, force)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return cert_path, key_path


def init_certs(
    directory: Path,
    *,
    hosts: Sequence[str] = (),
    node_hosts: Sequence[str] = (),
    nodes: Sequence[str] = ("node-1",),
    days: int = 365,
    force: bool = False,
) -> IssuedFiles:
    """Create the role CAs in ``directory`` and issue the mesh's certificates (see the module
    docstring). ``hosts``: extra DNS names / IP addresses of the control plane (the address
    nodes and clients dial); ``node_hosts``: those of the nodes' direct ports (only on node
    certificates). Raises FileExistsError (nothing is overwritten without ``force``) and
    ValueError for an empty node id or a name in both ``hosts`` and ``node_hosts``."""
    if any(not n for n in nodes):
        raise ValueError("node ids must not be empty")
    extra = [h.strip() for h in hosts if h.strip()]
    node_extra = [h.strip() for h in node_hosts if h.strip()]
    shared = sorted(set(extra) & {*node_extra, *nodes})
    if shared:  # a node certificate naming the control plane could impersonate it
        raise ValueError(
            f"{', '.join(shared)}: a control-plane name cannot be on node certificates"
        )
    directory.mkdir(parents=True, exist_ok=True)
    cas: dict[str, tuple[Path, Path]] = {}
    signers: dict[str, tuple[x509.Name, ec.EllipticCurvePrivateKey, x509.Certificate]] = {}
    for role in ROLES:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name(f"meshserve development {role} CA", f"{role}-ca")
        ca_cert = _issue(ca_name, ca_key, ca_name, ca_key, days=days, ca=True)
        cas[role] = _save(directory, f"{role}-ca", ca_cert, ca_key, force)
        signers[role] = (ca_name, ca_key, ca_cert)

    def leaf(role: str, stem: str, cn: str, sans: Sequence[str], server: bool) -> tuple[Path, Path]:
        ca_name, ca_key, _ = signers[role]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            _name(cn, role), key, ca_name, ca_key, days=days, sans=sans, server=server, client=True
        )
        return _save(directory, stem, cert, key, force)

    controlplane = leaf(
        "controlplane", "controlplane", "controlplane", [*_LOOPBACK, *extra], server=True
    )
    issued = {
        n: leaf("node", f"node-{n}", n, [n, *_LOOPBACK, *node_extra], server=True) for n in nodes
    }
    client = leaf("client", "client", "client", [], server=False)
    bundle = b"".join(
        signers[role][2].public_bytes(serialization.Encoding.PEM)
        for role in ("node", "client", "controlplane")
    )
    trust = directory / "controlplane-trust.crt"
    _write(trust, bundle, 0o644, force)
    return IssuedFiles(cas, controlplane, issued, client, trust)
