"""Certificates and keys of a deployment: a private CA and the SuperLink's TLS certificate,
and each SuperNode's authentication key pair."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.atomic import atomic_write_bytes
from federation.tools.deploy import DeployError


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _subject(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _san(host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    unique: list[x509.GeneralName] = []
    for n in names:
        if n not in unique:
            unique.append(n)
    return unique


def ensure_certificates(cert_dir: Path, host: str, *, generate: bool) -> TlsFiles:
    """``ca.crt``, ``server.pem`` and ``server.key`` in ``cert_dir``, generated when missing
    and allowed: a private CA (its key is discarded) signs a server certificate valid for
    ``host``, localhost and 127.0.0.1 (the SuperLink's own SuperExec connects locally)."""
    files = TlsFiles(cert_dir / "ca.crt", cert_dir / "server.pem", cert_dir / "server.key")
    if all(p.is_file() for p in (files.ca, files.cert, files.key)):
        return files
    if not generate:
        raise DeployError(
            f"{cert_dir}: needs ca.crt, server.pem and server.key (or set tls.generate: true)"
        )
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_subject("more-fl federation CA"))
        .issuer_name(_subject("more-fl federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_subject(host))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(_san(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    atomic_write_bytes(files.ca, ca.public_bytes(pem))
    atomic_write_bytes(files.cert, server.public_bytes(pem))
    atomic_write_bytes(
        files.key,
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        mode=0o600,
    )
    return files


def ensure_node_key(key_dir: Path, site: str) -> tuple[Path, Path]:
    """The SuperNode authentication key pair of ``site`` (EC P-384, OpenSSH format), made
    when missing: the private key stays with the site, the public key is registered."""
    private, public = key_dir / f"{site}.key", key_dir / f"{site}.key.pub"
    if private.is_file() and public.is_file():
        return private, public
    key = ec.generate_private_key(ec.SECP384R1())
    atomic_write_bytes(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    atomic_write_bytes(
        public,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
    )
    return private, public
