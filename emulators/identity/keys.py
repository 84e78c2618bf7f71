"""The emulator's token-signing key: RSA 2048 with a self-signed certificate, published as a JWKS entry.

Like Entra ID, the key id (``kid``) equals ``x5t``: the base64url SHA-1 thumbprint of the key's certificate,
and the JWKS entry carries the certificate in ``x5c``. When run as a CLI the key and certificate are kept in
one PEM file so tokens survive an emulator restart; tests keep them in memory.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm

__all__ = ["SIGNING_KEY_FILE", "SigningKey"]

SIGNING_KEY_FILE = "identity-signing-key.pem"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _self_signed(key: rsa.RSAPrivateKey) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Email Router identity emulator token signing")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )


@dataclass(frozen=True)
class SigningKey:
    private_key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @classmethod
    def generate(cls) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(key, _self_signed(key))

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """Load key + certificate from ``path`` (one PEM file), creating it (mode 0600) on first run."""
        if path.exists():
            data = path.read_bytes()
            key = serialization.load_pem_private_key(data, password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError(f"{path} does not hold an RSA private key")
            try:
                cert = x509.load_pem_x509_certificate(data)
            except ValueError:  # key only (hand-made file): derive a certificate and keep it
                cert = _self_signed(key)
                cls(key, cert)._write(path)
            return cls(key, cert)
        signing = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        signing._write(path)
        return signing

    def _write(self, path: Path) -> None:
        key_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.write_bytes(key_pem + self.certificate.public_bytes(serialization.Encoding.PEM))
        path.chmod(0o600)

    @cached_property
    def kid(self) -> str:
        return _b64url(self.certificate.fingerprint(hashes.SHA1()))  # noqa: S303 - x5t is SHA-1 by definition

    def jwk(self, issuer: str | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        entry.update(
            {
                "use": "sig",
                "kid": self.kid,
                "x5t": self.kid,
                "x5c": [base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode("ascii")],
            }
        )
        if issuer:
            entry["issuer"] = issuer
        return entry
