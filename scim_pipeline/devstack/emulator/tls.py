"""TLS material of the emulator: a private CA and a server certificate for localhost/127.0.0.1, kept in the home.

Clients trust the CA through ``REQUESTS_CA_BUNDLE`` (the SDK's token request) and
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` (its gRPC channel). Material is reused across restarts, so a client that
sourced ``emulator.env`` once keeps working; it is regenerated only when missing, unreadable or about to expire.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scim_pipeline.lib.private_files import write_private

ALPN_PROTOCOLS = ["http/1.1", "h2"]  # HTTP/1.1 first: a client offering both gets the token/control API
_VALID_DAYS = 825
_RENEW_BEFORE = dt.timedelta(days=7)


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scim-pipeline emulator"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private(path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _usable(files: TlsFiles) -> bool:
    try:
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        leaf = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        serialization.load_pem_private_key(files.server_key.read_bytes(), None)
    except (OSError, ValueError):
        return False
    horizon = dt.datetime.now(dt.timezone.utc) + _RENEW_BEFORE
    return ca.not_valid_after_utc > horizon and leaf.not_valid_after_utc > horizon and leaf.issuer == ca.subject


def ensure_tls_material(home: Path) -> TlsFiles:
    """The CA and server certificate under ``home/tls``, created on first use (ECDSA P-256: fast to make)."""
    folder = home / "tls"
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "emulator-ca.pem", folder / "emulator-server.pem", folder / "emulator-server-key.pem")
    if _usable(files):
        return files

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("scim-pipeline emulator CA")).issuer_name(_name("scim-pipeline emulator CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    # The CA key is not kept: nothing else is ever signed with it, and a key that does not exist cannot leak.
    _write_key(files.server_key, key)
    files.server_cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


def server_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # gRPC requires TLS 1.2+
    ctx.load_cert_chain(files.server_cert, files.server_key)
    ctx.set_alpn_protocols(ALPN_PROTOCOLS)
    return ctx
