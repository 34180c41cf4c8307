"""Issue this pod's TLS certificate when it starts (an init container), from its role's CA.

Replicas and nodes are dialled at their pod IPs (``--advertise $(POD_IP):PORT``), which no
certificate made in advance can name, so each pod gets its own, valid for ``--days``:

    python issue-pod-cert.py --ca-cert CA.crt --ca-key CA.key --common-name NAME \
        --san 10.42.3.17 --san meshserve-controlplane ... --out DIR

writes ``DIR/tls.crt`` and ``DIR/tls.key`` (mode 0400): an ECDSA P-256 key, a certificate for
server and client use with the common name (a node's id; ``controlplane`` for replicas) and
each ``--san`` (IP address or DNS name; ``localhost`` and ``127.0.0.1`` are always added, for the
probes). The CA key is mounted into this init container only, never into the serving one.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="issue-pod-cert.py", description=__doc__.split("\n")[0])
    p.add_argument("--ca-cert", required=True, type=Path, help="PEM certificate of the CA")
    p.add_argument("--ca-key", required=True, type=Path, help="PEM private key of the CA")
    p.add_argument("--common-name", required=True, help="CN (and a DNS SAN when it is one)")
    p.add_argument("--san", action="append", default=[], help="IP or DNS name (repeatable)")
    p.add_argument("--days", type=int, default=30, help="validity (default 30)")
    p.add_argument("--out", required=True, type=Path, help="directory for tls.crt and tls.key")
    return p


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def issue(ns: argparse.Namespace) -> None:
    ca = x509.load_pem_x509_certificate(ns.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ns.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey), "the CA key must be ECDSA"
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshserve"),
            x509.NameAttribute(NameOID.COMMON_NAME, ns.common_name),
        ]
    )
    names = [*ns.san, "localhost", "127.0.0.1"]
    if not _is_ip(ns.common_name):
        names.insert(0, ns.common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=ns.days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ns.out.mkdir(parents=True, exist_ok=True)
    for name, data in (
        (
            "tls.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
        ("tls.crt", cert.public_bytes(serialization.Encoding.PEM)),
    ):
        path = ns.out / name
        path.unlink(missing_ok=True)  # a restarted pod's old pair (mode 0400: not writable)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o400)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    issue(build_parser().parse_args())
