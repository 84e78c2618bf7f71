"""Start the identity emulator in-process for tests (TLS from ``ensure_tls``, free port, in-memory key)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from emulators.common import demo
from emulators.common.server import RunningServer, start_in_thread
from emulators.common.tls import ensure_tls

from .app import IdentityConfig, create_app
from .seed import demo_seed

__all__ = ["demo_seed", "federated_seed", "make_client_certificate", "start_identity"]


def start_identity(tls_dir: Path, seed: dict[str, Any] | None = None, token_lifetime_s: int = 3600) -> RunningServer:
    """Serve the emulator over HTTPS on a free loopback port; ``seed=None`` = the demo seed. Call ``.stop()``.

    Clients must trust ``ensure_tls(tls_dir).bundle`` (REQUESTS_CA_BUNDLE / SSL_CERT_FILE or ``verify=``).
    """
    tls = ensure_tls(tls_dir)
    app = create_app(IdentityConfig(seed=seed, token_lifetime_s=token_lifetime_s))
    running = start_in_thread(app, tls=tls, lifespan="off")  # no startup/shutdown hooks to run
    return _ForcefulStopServer(running.server, running.thread, running.host, running.port, running.scheme)


class _ForcefulStopServer(RunningServer):
    """Stops without waiting for idle keep-alive clients.

    msal's requests pool keeps TLS connections open; on a graceful stop uvicorn closes them and then
    waits until each is gone, which for TLS means waiting for the client's close_notify (it never comes
    from an idle pool) until asyncio's SSL shutdown timeout. A token service has nothing in flight
    worth draining in tests, so skip the wait.
    """

    def stop(self, timeout: float = 10.0) -> None:
        self.server.force_exit = True
        super().stop(timeout)


def make_client_certificate(common_name: str = "email-router-test-client") -> tuple[str, str]:
    """A fresh RSA 2048 key and self-signed certificate for certificate credentials: (key PEM, cert PEM).

    Register the certificate PEM in the seed (``demo_seed(certificates=[cert_pem])``); give msal or
    ``MsalTokenProvider`` the key (write ``key_pem + cert_pem`` to one file for a certificate path).
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def federated_seed(authority_host: str, *, secrets: list[str] | None = None,
                   extra_tenants: list[dict[str, Any]] | None = None,
                   extra_apps: list[dict[str, Any]] | None = None, **overrides: Any) -> dict[str, Any]:
    """The demo seed plus the router's user-assigned managed identity, configured as a federated identity
    credential on the demo app registration, as ``az ad app federated-credential create`` would::

        issuer = <authority host>/<tenant>/v2.0, subject = the identity's principal id,
        audiences = ["api://AzureADTokenExchange"]

    ``authority_host`` is the emulator's base URL (known once it listens: load the seed with
    ``POST /_emulator/seed``). ``secrets`` defaults to none: the app has no secret at all.
    """
    overrides.setdefault("federated_credentials", [{
        "name": "email-router-uai", "issuer": f"{authority_host.rstrip('/')}/{demo.TENANT_ID}/v2.0",
        "subject": demo.MANAGED_IDENTITY_PRINCIPAL_ID, "audiences": [demo.TOKEN_EXCHANGE_AUDIENCE],
    }])
    seed = demo_seed(secrets=[] if secrets is None else secrets, **overrides)
    seed["managed_identities"] = [{"client_id": demo.MANAGED_IDENTITY_CLIENT_ID,
                                   "principal_id": demo.MANAGED_IDENTITY_PRINCIPAL_ID,
                                   "tenant_id": demo.TENANT_ID, "display_name": "id-emailrouter (local)"}]
    seed["managed_identity_header"] = demo.MANAGED_IDENTITY_HEADER
    seed["tenants"] = [*seed["tenants"], *(extra_tenants or [])]
    seed["apps"] = [*seed["apps"], *(extra_apps or [])]
    return seed
