"""The identity emulator's seed: tenants, app registrations (secrets, certificates, federated identity
credentials, granted app roles) and user-assigned managed identities.

Seed JSON (documented in docs/identity-emulator.md)::

    {
      "tenants": [{"id": "<guid>", "domains": ["contoso.example"], "display_name": "Contoso"}],
      "apps": [{
        "client_id": "<guid>", "tenant_id": "<guid>", "display_name": "Email Router",
        "object_id": "<service principal object id>",
        "secrets": ["..."],
        "certificates": ["-----BEGIN CERTIFICATE-----..."],
        "federated_credentials": [{"name": "router-uai", "issuer": "https://<authority host>/<tenant>/v2.0",
                                   "subject": "<managed identity principal id>",
                                   "audiences": ["api://AzureADTokenExchange"]}],
        "roles": {"https://graph.microsoft.com": ["Mail.ReadWrite", "Mail.Send"]}
      }],
      "managed_identities": [{"client_id": "<guid>", "principal_id": "<guid>", "tenant_id": "<guid>",
                              "display_name": "id-emailrouter"}],
      "managed_identity_header": "...",  # the IDENTITY_HEADER secret the platform token endpoint requires
      "resources": null,            # optional allow-list of resource URIs; null/absent = any resource
      "token_lifetime_s": 3600      # optional; overrides the emulator's default lifetime
    }

The same ``client_id`` may appear once per tenant (a multi-tenant app's service principal in each tenant).
Federated identity credentials belong to the app *registration*, which lives in one tenant: they may be given on
one entry per ``client_id`` only, and a token request in any tenant where the app has a service principal is
checked against them (Entra: the managed identity and the app registration are in the same tenant, the app's
service principal may redeem the assertion in another tenant).
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from emulators.common import demo

__all__ = [
    "AppRegistration",
    "FederatedCredential",
    "ManagedIdentity",
    "RegisteredCertificate",
    "Seed",
    "SeedError",
    "Tenant",
    "demo_seed",
    "parse_seed",
]


class SeedError(ValueError):
    """The seed document is malformed; the message names the offending field."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def normalise_resource(resource: str) -> str:
    return resource.strip().rstrip("/").lower()


@dataclass(frozen=True)
class RegisteredCertificate:
    certificate: x509.Certificate
    x5t: str  # base64url SHA-1 of the DER certificate, as sent in a client assertion's "x5t" header
    x5t_s256: str  # base64url SHA-256, the "x5t#S256" header msal sends when it knows the certificate

    @classmethod
    def from_pem(cls, pem: str) -> RegisteredCertificate:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        return cls(
            certificate=cert,
            x5t=_b64url(cert.fingerprint(hashes.SHA1())),  # noqa: S303 - x5t is defined as SHA-1 (RFC 7515)
            x5t_s256=_b64url(cert.fingerprint(hashes.SHA256())),
        )


@dataclass(frozen=True)
class Tenant:
    id: str
    domains: tuple[str, ...]
    display_name: str


@dataclass(frozen=True)
class FederatedCredential:
    """A federated identity credential on an app registration (Graph ``federatedIdentityCredential``):
    an assertion whose ``iss`` and ``sub`` equal these (case-sensitive) and whose ``aud`` is one of
    ``audiences`` may stand in for the app's secret."""

    name: str
    issuer: str
    subject: str
    audiences: tuple[str, ...]


@dataclass(frozen=True)
class ManagedIdentity:
    """A user-assigned managed identity: ``client_id`` selects it on the platform token endpoint; its tokens carry
    ``principal_id`` (the service principal's object id) as ``sub`` and ``oid``."""

    client_id: str
    principal_id: str
    tenant_id: str
    display_name: str


@dataclass(frozen=True)
class AppRegistration:
    client_id: str
    tenant_id: str
    display_name: str
    object_id: str
    secrets: tuple[str, ...]
    certificates: tuple[RegisteredCertificate, ...]
    roles: Mapping[str, frozenset[str]]  # normalised resource -> granted application roles
    federated_credentials: tuple[FederatedCredential, ...] = ()

    def roles_for(self, resource: str) -> frozenset[str]:
        return self.roles.get(normalise_resource(resource), frozenset())

    def certificate_by_thumbprint(self, *, x5t: str | None, x5t_s256: str | None) -> RegisteredCertificate | None:
        # msal sends the thumbprints base64url-encoded *with* "=" padding; RFC 7515 says without
        x5t = x5t.rstrip("=") if x5t else None
        x5t_s256 = x5t_s256.rstrip("=") if x5t_s256 else None
        for cert in self.certificates:
            if (x5t_s256 and cert.x5t_s256 == x5t_s256) or (x5t and cert.x5t == x5t):
                return cert
        return None


@dataclass(frozen=True)
class Seed:
    tenants: Mapping[str, Tenant]  # by lower-case id
    apps: Mapping[tuple[str, str], AppRegistration]  # by (tenant id, client id), lower-case
    resources: frozenset[str] | None  # normalised allow-list; None = any
    token_lifetime_s: int | None
    domains: Mapping[str, str] = field(default_factory=dict)  # lower-case domain -> tenant id
    managed_identities: Mapping[str, ManagedIdentity] = field(default_factory=dict)  # by lower-case client id
    managed_identity_header: str | None = None  # None = the platform token endpoint is off

    def federated_credentials(self, client_id: str) -> tuple[FederatedCredential, ...]:
        """The app registration's federated identity credentials (whichever tenant's entry declares them)."""
        for (_tenant, cid), app in self.apps.items():
            if cid == client_id.lower() and app.federated_credentials:
                return app.federated_credentials
        return ()

    def managed_identity(self, client_id: str) -> ManagedIdentity | None:
        return self.managed_identities.get(client_id.lower())

    def tenant(self, id_or_domain: str) -> Tenant | None:
        key = id_or_domain.lower()
        tenant = self.tenants.get(key)
        if tenant is None and key in self.domains:
            tenant = self.tenants.get(self.domains[key])
        return tenant

    def app(self, tenant_id: str, client_id: str) -> AppRegistration | None:
        return self.apps.get((tenant_id.lower(), client_id.lower()))

    def resource_known(self, resource: str) -> bool:
        return self.resources is None or normalise_resource(resource) in self.resources


def _str(obj: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str) or not value:
        raise SeedError(f"{where}.{key} must be a non-empty string")
    return value


def _str_list(obj: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SeedError(f"{where}.{key} must be a list of non-empty strings")
    return value


def parse_seed(document: Mapping[str, Any]) -> Seed:
    """Validate and index a seed document; raises :class:`SeedError` naming the bad field."""
    if not isinstance(document, Mapping):
        raise SeedError("seed must be a JSON object")
    tenants: dict[str, Tenant] = {}
    domains: dict[str, str] = {}
    raw_tenants = document.get("tenants")
    if not isinstance(raw_tenants, list) or not raw_tenants:
        raise SeedError("seed.tenants must be a non-empty list")
    for i, raw in enumerate(raw_tenants):
        where = f"tenants[{i}]"
        if not isinstance(raw, Mapping):
            raise SeedError(f"{where} must be an object")
        tid = _str(raw, "id", where)
        tenant = Tenant(
            id=tid,
            domains=tuple(_str_list(raw, "domains", where)),
            display_name=str(raw.get("display_name", tid)),
        )
        tenants[tid.lower()] = tenant
        for domain in tenant.domains:
            domains[domain.lower()] = tid.lower()

    apps: dict[tuple[str, str], AppRegistration] = {}
    raw_apps = document.get("apps", [])
    if not isinstance(raw_apps, list):
        raise SeedError("seed.apps must be a list")
    for i, raw in enumerate(raw_apps):
        where = f"apps[{i}]"
        if not isinstance(raw, Mapping):
            raise SeedError(f"{where} must be an object")
        client_id = _str(raw, "client_id", where)
        tenant_id = _str(raw, "tenant_id", where)
        if tenant_id.lower() not in tenants:
            raise SeedError(f"{where}.tenant_id {tenant_id!r} is not a seeded tenant")
        certificates = []
        for j, pem in enumerate(_str_list(raw, "certificates", where)):
            try:
                certificates.append(RegisteredCertificate.from_pem(pem))
            except ValueError as exc:
                raise SeedError(f"{where}.certificates[{j}] is not a PEM certificate: {exc}") from None
        raw_roles = raw.get("roles", {})
        if not isinstance(raw_roles, Mapping):
            raise SeedError(f"{where}.roles must be an object of resource -> [roles]")
        roles: dict[str, frozenset[str]] = {}
        for resource, granted in raw_roles.items():
            if not isinstance(granted, list) or not all(isinstance(r, str) for r in granted):
                raise SeedError(f"{where}.roles[{resource!r}] must be a list of role names")
            roles[normalise_resource(resource)] = frozenset(granted)
        federated = _federated_credentials(raw, where)
        if federated and any(cid == client_id.lower() and a.federated_credentials for (_t, cid), a in apps.items()):
            raise SeedError(f"{where}.federated_credentials: the app registration of {client_id!r} already has "
                            "them (they belong to the registration, in one tenant)")
        app = AppRegistration(
            client_id=client_id,
            tenant_id=tenants[tenant_id.lower()].id,
            display_name=str(raw.get("display_name", client_id)),
            object_id=_str(raw, "object_id", where),
            secrets=tuple(_str_list(raw, "secrets", where)),
            certificates=tuple(certificates),
            roles=roles,
            federated_credentials=federated,
        )
        key = (tenant_id.lower(), client_id.lower())
        if key in apps:
            raise SeedError(f"{where}: client_id {client_id!r} appears twice in tenant {tenant_id!r}")
        apps[key] = app

    identities: dict[str, ManagedIdentity] = {}
    raw_identities = document.get("managed_identities", [])
    if not isinstance(raw_identities, list):
        raise SeedError("seed.managed_identities must be a list")
    for i, raw in enumerate(raw_identities):
        where = f"managed_identities[{i}]"
        if not isinstance(raw, Mapping):
            raise SeedError(f"{where} must be an object")
        mi_tenant = _str(raw, "tenant_id", where)
        if mi_tenant.lower() not in tenants:
            raise SeedError(f"{where}.tenant_id {mi_tenant!r} is not a seeded tenant")
        identity = ManagedIdentity(client_id=_str(raw, "client_id", where),
                                   principal_id=_str(raw, "principal_id", where),
                                   tenant_id=tenants[mi_tenant.lower()].id,
                                   display_name=str(raw.get("display_name", raw.get("client_id"))))
        if identity.client_id.lower() in identities:
            raise SeedError(f"{where}: client_id {identity.client_id!r} appears twice")
        identities[identity.client_id.lower()] = identity
    header = document.get("managed_identity_header")
    if header is not None and (not isinstance(header, str) or not header):
        raise SeedError("seed.managed_identity_header must be a non-empty string or null")

    raw_resources = document.get("resources")
    resources: frozenset[str] | None = None
    if raw_resources is not None:
        if not isinstance(raw_resources, list) or not all(isinstance(r, str) for r in raw_resources):
            raise SeedError("seed.resources must be null or a list of resource URIs")
        resources = frozenset(normalise_resource(r) for r in raw_resources)

    lifetime = document.get("token_lifetime_s")
    if lifetime is not None and (not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime < 1):
        raise SeedError("seed.token_lifetime_s must be a positive integer")
    return Seed(tenants=tenants, apps=apps, resources=resources, token_lifetime_s=lifetime, domains=domains,
                managed_identities=identities, managed_identity_header=header)


def _federated_credentials(raw: Mapping[str, Any], where: str) -> tuple[FederatedCredential, ...]:
    value = raw.get("federated_credentials", [])
    if not isinstance(value, list):
        raise SeedError(f"{where}.federated_credentials must be a list")
    found: list[FederatedCredential] = []
    for j, entry in enumerate(value):
        here = f"{where}.federated_credentials[{j}]"
        if not isinstance(entry, Mapping):
            raise SeedError(f"{here} must be an object")
        audiences = _str_list(entry, "audiences", here)
        if len(audiences) != 1:  # Graph: "audiences ... can only have one value"
            raise SeedError(f"{here}.audiences must hold exactly one audience")
        credential = FederatedCredential(name=_str(entry, "name", here), issuer=_str(entry, "issuer", here),
                                         subject=_str(entry, "subject", here), audiences=tuple(audiences))
        if any((c.issuer, c.subject) == (credential.issuer, credential.subject) for c in found):
            raise SeedError(f"{here}: issuer and subject must be unique on the app")
        found.append(credential)
    if len(found) > 20:  # Entra: at most 20 federated identity credentials per application
        raise SeedError(f"{where}.federated_credentials: at most 20 per application")
    return tuple(found)


_APP_FIELDS = frozenset({"client_id", "display_name", "object_id", "secrets", "certificates", "roles",
                         "federated_credentials"})


def demo_seed(**overrides: Any) -> dict[str, Any]:
    """The default seed: the demo tenant and the router's app from ``emulators/common/demo.py``.

    Keyword overrides that name an app field (client_id, display_name, object_id, secrets, certificates,
    roles) change the demo app; any other key (tenants, apps, resources, token_lifetime_s) replaces that
    top-level seed field. Example: ``demo_seed(certificates=[cert_pem], token_lifetime_s=5)``.
    """
    app: dict[str, Any] = {
        "client_id": demo.APP_CLIENT_ID,
        "tenant_id": demo.TENANT_ID,
        "display_name": "Email Router (local demo)",
        "object_id": demo.APP_OBJECT_ID,
        "secrets": [demo.APP_CLIENT_SECRET],
        "certificates": [],
        "roles": {demo.GRAPH_RESOURCE: list(demo.GRAPH_APP_ROLES)},
    }
    seed: dict[str, Any] = {
        "tenants": [{"id": demo.TENANT_ID, "domains": [demo.TENANT_DOMAIN], "display_name": "Contoso (local demo)"}],
        "apps": [app],
        "resources": None,
    }
    for key, value in overrides.items():
        if key in _APP_FIELDS:
            app[key] = copy.deepcopy(value)
        else:
            seed[key] = copy.deepcopy(value)
    return seed
