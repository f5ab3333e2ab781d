"""Private files of `warlock run`: 0600 writes, the SSH worker's key, and the local CA (wss:// in dev).

The CA is kept across runs (agents pin it); the gateway's and the NATS routes' certificates are made anew
when missing, not signed by it, or close to expiry.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def ensure_ssh_key(path: Path) -> Path:
    """The SSH fallback worker's private key at `path` (ed25519, 0600), generated on first use."""
    if not path.exists():
        import asyncssh

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519", comment="warlock-fallback-ssh")
        write_private(path, key.export_private_key().decode())
        path.with_suffix(".pub").write_bytes(key.export_public_key())
    return path


# ----------------------------------------------------------------------------- local CA (wss:// in dev)

CA_DAYS = 3650
CERT_DAYS = 365
RENEW_DAYS = 30  # a gateway certificate this close to expiry is made anew at the next start


@dataclass(frozen=True)
class DevTls:
    """The dev stack's TLS files: the local CA agents pin, and the gateway's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(path, pem.decode())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The local CA (kept across runs: agents pin it); made when missing or unusable."""
    key_path, cert_path = directory / "ca.key", directory / "ca.pem"
    key, cert = _load_key(key_path), _load_cert(cert_path)
    now = datetime.now(UTC)
    if (
        key is not None
        and cert is not None
        and cert.public_key() == key.public_key()
        and cert.not_valid_after_utc > now + timedelta(days=RENEW_DAYS)
    ):
        return key, cert
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"Warlock dev CA ({socket.gethostname()})")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CA_DAYS))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cert_path.chmod(0o644)
    return key, cert


def _leaf(
    directory: Path, name: str, common_name: str, usages: list[x509.ObjectIdentifier]
) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / ::1 / localhost signed by the local CA of `directory` (made with
    `_ca`): ``<name>.pem`` and ``<name>.key`` (0600). Made anew when missing, not signed by this CA, not
    for these extended key `usages`, or within `RENEW_DAYS` of expiry."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca_key, ca_cert = _ca(directory)
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    key, cert = _load_key(key_file), _load_cert(cert_file)
    now = datetime.now(UTC)
    if (
        key is not None
        and cert is not None
        and cert.public_key() == key.public_key()
        and cert.issuer == ca_cert.subject
        and cert.not_valid_after_utc > now + timedelta(days=RENEW_DAYS)
    ):
        with contextlib.suppress(ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            cert.verify_directly_issued_by(ca_cert)
            if set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == set(usages):
                return cert_file, key_file
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(key_file, key)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cert_file.chmod(0o644)
    return cert_file, key_file


def ensure_dev_tls(directory: Path) -> DevTls:
    """A local CA and a gateway certificate for 127.0.0.1 / ::1 / localhost in `directory` (0700; key files
    0600), made with `cryptography` on first use. The CA is kept; the gateway certificate is made anew when
    it is missing, not signed by this CA, or within `RENEW_DAYS` of expiry."""
    cert_file, key_file = _leaf(
        directory, "gateway", "warlock dev gateway", [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    return DevTls(directory / "ca.pem", cert_file, key_file)


def ensure_route_tls(directory: Path) -> DevTls:
    """The certificate every node of `warlock run --cluster` presents on its routes, signed by the same
    local CA (`ensure_dev_tls`): for 127.0.0.1 / ::1 / localhost, usable as server and as client, since a
    node dialling a route is the TLS client and the accepting node verifies its certificate."""
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert_file, key_file = _leaf(directory, "nats-route", "warlock dev nats route", usages)
    return DevTls(directory / "ca.pem", cert_file, key_file)
