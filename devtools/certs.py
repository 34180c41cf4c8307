"""A development certificate authority for a mutual-TLS mesh (``meshctl certs init``).

Contract: :func:`init_certs` creates ``DIR`` (if needed) and writes, as PEM files,

- ``ca.crt`` / ``ca.key``: a self-signed CA (the ``--tls-ca`` of every process);
- ``controlplane.crt`` / ``.key``: CN ``controlplane``, SANs ``localhost``, ``127.0.0.1``, ``::1``
  and every ``hosts`` entry; usable as a server certificate (the CP listener) and as a client
  certificate (the gateway dialling nodes' direct ports);
- ``node-<id>.crt`` / ``.key`` per node id: CN and a DNS SAN equal to the node id (the control
  plane checks a node's claimed id against them), plus the loopback SANs and ``hosts`` (the
  node's own direct OIP port); server and client use;
- ``client.crt`` / ``.key``: CN ``client``, client use only (SDK, meshctl).

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

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["IssuedFiles", "init_certs"]

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class IssuedFiles:
    """What :func:`init_certs` wrote (paths), by role."""

    ca_cert: Path
    ca_key: Path
    controlplane: tuple[Path, Path]
    nodes: dict[str, tuple[Path, Path]]
    client: tuple[Path, Path]

    def all(self) -> list[Path]:
        out = [self.ca_cert, self.ca_key, *self.controlplane]
        for pair in self.nodes.values():
            out.extend(pair)
        out.extend(self.client)
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
    nodes: Sequence[str] = ("node-1",),
    days: int = 365,
    force: bool = False,
) -> IssuedFiles:
    """Create a development CA in ``directory`` and issue the mesh's certificates (see the
    module docstring). ``hosts``: extra DNS names / IP addresses for the control-plane and node
    certificates (the addresses other machines dial). Raises FileExistsError (nothing is
    overwritten without ``force``) and ValueError for an empty node id."""
    if any(not n for n in nodes):
        raise ValueError("node ids must not be empty")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("meshserve development CA", "ca")
    ca_cert = _issue(ca_name, ca_key, ca_name, ca_key, days=days, ca=True)
    ca_cert_path, ca_key_path = _save(directory, "ca", ca_cert, ca_key, force)

    def leaf(stem: str, cn: str, unit: str, sans: Sequence[str], server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            _name(cn, unit), key, ca_name, ca_key, days=days, sans=sans, server=server, client=True
        )
        return _save(directory, stem, cert, key, force)

    extra = [h.strip() for h in hosts if h.strip()]
    controlplane = leaf(
        "controlplane", "controlplane", "controlplane", [*_LOOPBACK, *extra], server=True
    )
    issued = {n: leaf(f"node-{n}", n, "node", [n, *_LOOPBACK, *extra], True) for n in nodes}
    client = leaf("client", "client", "client", [], server=False)
    return IssuedFiles(ca_cert_path, ca_key_path, controlplane, issued, client)
