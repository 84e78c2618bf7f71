"""Local TLS: a CA and a loopback server certificate generated on first run, plus a trust bundle.

MSAL refuses http authorities and the real clients verify certificates, so the emulators serve
HTTPS with a certificate from a local CA. Clients trust it the way a corporate CA is trusted:
``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` point at ``bundle.pem`` (system CAs + the local CA).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TlsMaterial", "client_env", "ensure_tls"]


@dataclass(frozen=True)
class TlsMaterial:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    bundle: Path  # system CAs + local CA: what REQUESTS_CA_BUNDLE / SSL_CERT_FILE point at


def _system_ca_text() -> str:
    try:
        import certifi

        return Path(certifi.where()).read_text()
    except Exception:  # certifi missing: fall back to the OS bundle if there is one
        for candidate in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
            if os.path.exists(candidate):
                return Path(candidate).read_text()
    return ""


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def ensure_tls(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")) -> TlsMaterial:
    """Create (once) a CA and a server certificate for ``hosts`` under ``directory``; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert_p, ca_key_p = directory / "ca.pem", directory / "ca-key.pem"
    srv_cert_p, srv_key_p = directory / "server.pem", directory / "server-key.pem"
    bundle_p = directory / "bundle.pem"
    now = dt.datetime.now(dt.UTC)

    if not (ca_cert_p.exists() and ca_key_p.exists()):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Email Router local CA (emulators only)")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(
            ca_key_p,
            ca_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        ca_cert_p.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        srv_cert_p.unlink(missing_ok=True)  # a new CA invalidates the old server certificate

    if not (srv_cert_p.exists() and srv_key_p.exists()):
        ca_key_loaded = serialization.load_pem_private_key(ca_key_p.read_bytes(), password=None)
        ca_cert_loaded = x509.load_pem_x509_certificate(ca_cert_p.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert_loaded.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert_loaded.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .sign(ca_key_loaded, hashes.SHA256())  # type: ignore[arg-type]
        )
        _write_private(
            srv_key_p,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        srv_cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_text = ca_cert_p.read_text()
    bundle_text = _system_ca_text().rstrip("\n") + "\n" + ca_text
    if not bundle_p.exists() or bundle_p.read_text() != bundle_text:
        bundle_p.write_text(bundle_text)
    return TlsMaterial(ca_cert_p, srv_cert_p, srv_key_p, bundle_p)


def client_env(tls: TlsMaterial) -> dict[str, str]:
    """Environment for processes that must trust the local CA (requests/msal and httpx)."""
    return {"REQUESTS_CA_BUNDLE": str(tls.bundle), "SSL_CERT_FILE": str(tls.bundle)}
