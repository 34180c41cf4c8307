"""Certificates a test issues itself from a ``meshctl certs init`` directory's role CAs: what a
holder of a role's CA (or an operator's mistake) could make, e.g. a client certificate named
``controlplane``."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def issue_from(certs: Path, role: str, common_name: str, stem: str) -> tuple[Path, Path]:
    """A client certificate with CN ``common_name`` signed by ``certs/<role>-ca``: written as
    ``certs/<stem>.crt`` / ``.key``, returned as (certificate, key) paths."""
    ca = x509.load_pem_x509_certificate((certs / f"{role}-ca.crt").read_bytes())
    signer = serialization.load_pem_private_key((certs / f"{role}-ca.key").read_bytes(), None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    cert_path, key_path = certs / f"{stem}.crt", certs / f"{stem}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
