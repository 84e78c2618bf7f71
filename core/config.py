"""Typed configuration, read lazily from app settings (environment variables).

One place for every setting the product reads. Nothing here runs at import time that can fail:
``get_settings()`` reads the environment on first use and caches the result; a missing required
setting raises :class:`MissingSettingError` naming it, at the moment a component needs it.

The registry ``SETTINGS`` is the single source for the README's settings table and for the
infrastructure drift test (every setting read here appears in ``infra/`` or is optional).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Final

__all__ = [
    "SETTINGS",
    "ClientCredential",
    "ConfigError",
    "MissingSettingError",
    "Setting",
    "Settings",
    "UnresolvedReferenceError",
    "get_settings",
    "is_unresolved_reference",
    "reset_settings_cache",
    "unresolved_settings",
]

VERSION: Final = "0.1.0"


class ConfigError(RuntimeError):
    """A setting is missing or has an invalid value."""


class MissingSettingError(ConfigError):
    def __init__(self, name: str, meaning: str) -> None:
        super().__init__(f"Missing required app setting {name!r}: {meaning}")
        self.setting = name


# App Service replaces ``@Microsoft.KeyVault(...)`` (and App Configuration's ``@Microsoft.AppConfiguration(...)``)
# with the secret's value when it can; when it can't, the app setting keeps the literal reference text
# (learn.microsoft.com app-service-key-vault-references, Troubleshooting). Such a value is never a credential.
_REFERENCE_PREFIXES: Final = ("@microsoft.keyvault(", "@microsoft.appconfiguration(")
UNRESOLVED_REASON: Final = (
    "Key Vault reference not resolved: the secret is missing, or the app's identity lacks the "
    "Key Vault Secrets User role (or the role has not propagated yet)"
)


def is_unresolved_reference(value: str | None) -> bool:
    """True when an app setting still holds the text of a Key Vault / App Configuration reference."""
    return bool(value) and value.strip().lower().startswith(_REFERENCE_PREFIXES)  # type: ignore[union-attr]


class UnresolvedReferenceError(MissingSettingError):
    """An app setting is a Key Vault reference that App Service could not resolve: the value is the reference text.

    A :class:`MissingSettingError` (the setting has no usable value); the message names the setting and the
    reason, never the reference (it names the vault and secret, which is no secret but is noise in alerts).
    """

    def __init__(self, name: str) -> None:
        ConfigError.__init__(self, f"App setting {name!r}: {UNRESOLVED_REASON}")
        self.setting = name


def unresolved_settings(env: Mapping[str, str] | None = None) -> list[str]:
    """Names of the app settings (any, not only the router's) whose value is an unresolved reference, sorted.

    For ``/api/health`` and ``emailrouter doctor``; pass the values the caller uses (default: the environment).
    """
    env = os.environ if env is None else env
    return sorted(name for name, value in env.items() if is_unresolved_reference(value))


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None  # None = required (unless `optional`)
    meaning: str
    secret: bool = False
    optional: bool = False  # may be absent; features depending on it are off

    @property
    def required(self) -> bool:
        return self.default is None and not self.optional


# Every app setting the product reads. Order = README order.
SETTINGS: Final[tuple[Setting, ...]] = (
    # Storage
    Setting("AzureWebJobsStorage", None,
            "Storage connection string for queues and tables (Functions host storage). With a managed "
            "identity use AzureWebJobsStorage__queueServiceUri/__tableServiceUri instead.", secret=True,
            optional=True),
    Setting("AzureWebJobsStorage__queueServiceUri", None,
            "Queue endpoint when storage is reached with a managed identity.", optional=True),
    Setting("AzureWebJobsStorage__tableServiceUri", None,
            "Table endpoint when storage is reached with a managed identity.", optional=True),
    Setting("AzureWebJobsStorage__clientId", None,
            "Client id of the user-assigned managed identity used for storage.", optional=True),
    Setting("TABLE_PREFIX", "emailrouter",
            "Prefix of every Azure Table the router keeps (letters and digits only)."),
    # Microsoft Graph (Exchange Online)
    Setting("GRAPH_TENANT_ID", None, "Entra tenant id of the Exchange Online organisation."),
    Setting("GRAPH_CLIENT_ID", None, "Application (client) id of the app registration used for Graph."),
    Setting("GRAPH_CLIENT_SECRET", None,
            "Client secret for Graph (or use GRAPH_CLIENT_CERTIFICATE_PATH).", secret=True, optional=True),
    Setting("GRAPH_CLIENT_CERTIFICATE_PATH", None,
            "PEM file with private key and certificate for Graph (certificate credential).", optional=True),
    Setting("GRAPH_MANAGED_IDENTITY_CLIENT_ID", None,
            "Client id of the user-assigned managed identity that is a federated identity credential on the app "
            "registration: the router signs in with that identity's token as client assertion (no secret). Wins "
            "over GRAPH_CLIENT_SECRET / GRAPH_CLIENT_CERTIFICATE_PATH; Dataverse uses it too unless it has its own "
            "credential.", optional=True),
    Setting("FEDERATED_TOKEN_AUDIENCE", "api://AzureADTokenExchange",
            "Audience of the managed identity token used as client assertion (api://AzureADTokenExchangeUSGov or "
            "api://AzureADTokenExchangeChina in national clouds)."),
    Setting("GRAPH_AUTHORITY_HOST", "https://login.microsoftonline.com",
            "Identity platform host for Graph tokens."),
    Setting("GRAPH_BASE_URL", "https://graph.microsoft.com/v1.0", "Microsoft Graph base URL."),
    Setting("GRAPH_SCOPE", "https://graph.microsoft.com/.default", "Scope requested for Graph tokens."),
    # Dataverse (Dynamics 365)
    Setting("DATAVERSE_URL", None, "Organisation URL, e.g. https://contoso.crm.dynamics.com."),
    Setting("DATAVERSE_TENANT_ID", "",
            "Tenant of the Dataverse org; empty = GRAPH_TENANT_ID (set it for cross-tenant setups)."),
    Setting("DATAVERSE_CLIENT_ID", "", "App (client) id for Dataverse; empty = GRAPH_CLIENT_ID."),
    Setting("DATAVERSE_CLIENT_SECRET", None,
            "Client secret for Dataverse; empty = GRAPH_CLIENT_SECRET.", secret=True, optional=True),
    Setting("DATAVERSE_CLIENT_CERTIFICATE_PATH", None,
            "PEM file (key + certificate) for Dataverse; empty = GRAPH_CLIENT_CERTIFICATE_PATH.", optional=True),
    Setting("DATAVERSE_AUTHORITY", "",
            "Full token authority for Dataverse; empty = GRAPH_AUTHORITY_HOST/DATAVERSE_TENANT_ID. "
            "Set an AD FS authority for Dynamics 365 on-premises."),
    Setting("DATAVERSE_SCOPE", "", "Scope for Dataverse tokens; empty = DATAVERSE_URL + '/.default'."),
    Setting("DATAVERSE_API_VERSION", "v9.2", "Dataverse Web API version."),
    Setting("DATAVERSE_CLIENT_IDS", "",
            "Application-user pool: comma-separated app (client) ids, each an application user of the org with the "
            "router's security role. Requests are spread across them, each paced to its own service-protection "
            "budget (docs/deploy.md §9 sizes the pool). Empty = DATAVERSE_CLIENT_ID alone."),
    Setting("DATAVERSE_CLIENT_SECRETS", None,
            "Client secrets of DATAVERSE_CLIENT_IDS, comma-separated in the same order (e.g. one Key Vault secret "
            "holding the list). Empty = every app of the pool signs in with the Dataverse credential (a "
            "certificate or the managed identity's federated credential added to each app).", secret=True,
            optional=True),
    Setting("DATAVERSE_USER_REQUESTS_PER_WINDOW", "6000",
            "Service protection: requests per application user per window (Dataverse: 6,000 per 300 s)."),
    Setting("DATAVERSE_USER_WINDOW_SECONDS", "300", "Service protection: the sliding window, in seconds."),
    Setting("DATAVERSE_USER_EXECUTION_MS", "1200000",
            "Service protection: execution time per application user per window, in milliseconds."),
    Setting("DATAVERSE_USER_CONCURRENCY", "52", "Service protection: concurrent requests per application user."),
    Setting("DATAVERSE_BUDGET_PERCENT", "95",
            "Part of each application user's budget one instance paces itself to, in percent. 95 keeps a single "
            "busy instance 429-free; with several busy at once use 95 / their number, or leave it and let "
            "Retry-After pauses absorb the overlap (docs/deploy.md §9)."),
    # Webhooks
    Setting("WEBHOOK_BASE_URL", None,
            "Public base URL of this Function App's HTTP functions, e.g. https://app.azurewebsites.net/api; "
            "notification and lifecycle URLs are built from it.", optional=True),
    Setting("WEBHOOK_FUNCTION_KEY", None,
            "Function key appended as ?code= to the notification URLs given to Graph.", secret=True, optional=True),
    Setting("WEBHOOK_MAX_BODY_BYTES", "1048576", "Largest notification body accepted (413 beyond)."),
    # Schedules (6-field NCRONTAB, seconds first)
    Setting("SUBSCRIPTION_RECONCILE_SCHEDULE", "0 */15 * * * *", "When subscriptions are reconciled."),
    Setting("DELTA_CATCHUP_SCHEDULE", "0 */5 * * * *", "When delta catch-up rounds run."),
    Setting("OUTBOUND_SCAN_SCHEDULE", "*/15 * * * * *", "When CRM is scanned for Pending Send emails."),
    Setting("CRM_SYNC_SCHEDULE", "0 */15 * * * *", "When delivery methods are synced from CRM."),
    Setting("MAILBOX_HEALTH_SCHEDULE", "*/30 * * * * *",
            "How often CRM's Test & Enable requests are answered and mailboxes due for a health probe are looked "
            "at (each mailbox backs off on its own)."),
    Setting("RETENTION_MAX_DELETES", "5000",
            "Most rows and wrappers one retention run deletes (the rest waits for the next run)."),
    # Pipelines (engineering knobs; admin-facing behaviour lives in the OrgSettings table)
    Setting("CRM_PARTY_CACHE_SECONDS", "120", "How long resolved sender/recipient lookups are cached per instance."),
    Setting("CRM_CORRELATION_DAYS", "90",
            "Correlation looks at CRM emails created this many days back (0 = no bound), like SSS smart matching."),
    Setting("INBOUND_MAX_ATTEMPTS", "20",
            "Transient failures of one inbound message before it is recorded as failed and poisoned."),
    Setting("INBOUND_MAX_RETRY_DELAY_SECONDS", "900", "Longest visibility delay when an inbound item is retried."),
    Setting("SUBSCRIPTION_LIFETIME_MINUTES", "4200",
            "Requested Graph subscription lifetime (<= 4230 is valid everywhere; the current Learn page allows "
            "10,080 for Outlook resources)."),
    Setting("SUBSCRIPTION_RENEW_BEFORE_MINUTES", "1440", "Renew subscriptions expiring within this many minutes."),
    Setting("SUBSCRIPTION_CREATE_CONCURRENCY", "8",
            "Subscription creates in flight; each makes Graph send 1-2 validation requests to the webhook."),
    Setting("SUBSCRIPTION_WRITES_PER_20S", "950",
            "Subscription writes (create/renew/delete) per 20 s the router allows itself (Graph: 1,000 per app)."),
    Setting("SUBSCRIPTION_REAUTHORIZE_COALESCE_MINUTES", "10",
            "A reauthorizationRequired for a subscription renewed this recently needs no PATCH."),
    Setting("AZURE_SDK_HTTP_LOGS", "false",
            "true: keep the Azure SDKs' per-request INFO logs (URL and headers of every storage call) for a "
            "diagnosis; by default only their warnings and errors are logged."),
    Setting("HOT_MAILBOX_NOTIFICATIONS_PER_MINUTE", "600",
            "Notifications per minute for one mailbox folder (per webhook instance) above which they become one "
            "delta round per HOT_MAILBOX_DELTA_DELAY_SECONDS, worked under the mailbox's lease (0: never)."),
    Setting("HOT_MAILBOX_DELTA_DELAY_SECONDS", "5",
            "A hot mailbox's notifications are collected this long into one delta round (its added latency)."),
    Setting("HOT_MAILBOX_INLINE_CONCURRENCY", "6",
            "Messages all hot-mailbox delta rounds of one instance process at once (each holds its kept "
            "attachments; Graph requests stay at 4 per mailbox)."),
    Setting("DELTA_CHANGE_TYPE", "created",
            "changeType of delta rounds: created (later rounds skip read flags and other updates; NOT VERIFIED "
            "that Exchange reports a message moved into the folder as created) or all."),
    Setting("OUTBOUND_PER_SENDER_CAP", "20", "Emails per sender enqueued per scan (fairness across senders)."),
    Setting("OUTBOUND_SCAN_MAX_ROWS", "50000", "Most Pending Send rows one scan reads."),
    Setting("OUTBOUND_LEASE_SECONDS", "300", "How long a worker holds an outbound email before another may take over."),
    Setting("OUTBOUND_REQUEUE_AFTER_SECONDS", "300",
            "An email still Pending Send this long after it was enqueued is enqueued again."),
    Setting("OUTBOUND_RETRY_BASE_SECONDS", "30", "First back-off after a transient send failure (doubles)."),
    Setting("OUTBOUND_RETRY_MAX_SECONDS", "3600", "Longest back-off between send attempts."),
    Setting("OUTBOUND_SEND_SETTLE_SECONDS", "60",
            "After a crash, wait this long before re-sending a draft whose send may have been accepted."),
    Setting("OUTBOUND_CHOOSE_MESSAGE_ID", "true",
            "Give each outbound draft a Message-ID carrying the CRM activity id before it is created (Graph: "
            "internetMessageId is updatable while isDraft); false = Exchange's own id."),
    # Logging
    Setting("LOG_LEVEL", "INFO", "Log level of the router's own loggers."),
)

_BY_NAME: Final[Mapping[str, Setting]] = {s.name: s for s in SETTINGS}


def _read(env: Mapping[str, str], name: str) -> str:
    spec = _BY_NAME[name]
    value = env.get(name)
    if value is None or value == "":
        if spec.default is None:
            if spec.optional:
                return ""
            raise MissingSettingError(name, spec.meaning)
        return spec.default
    if is_unresolved_reference(value):
        raise UnresolvedReferenceError(name)
    return value


@dataclass(frozen=True)
class ClientCredential:
    """How the router signs in to one app registration. Exactly one of the three is set.

    ``managed_identity_client_id``: a user-assigned managed identity that is a federated identity credential on the
    app registration (its token for ``federated_audience`` is the client assertion); ``certificate_path``: a PEM file
    (key + certificate); ``secret``: a client secret.
    """

    secret: str = ""
    certificate_path: str = ""
    managed_identity_client_id: str = ""
    federated_audience: str = ""

    @property
    def kind(self) -> str:
        if self.managed_identity_client_id:
            return "managed_identity"
        return "certificate" if self.certificate_path else "secret"

    def __repr__(self) -> str:  # never the secret
        return f"ClientCredential(kind={self.kind!r})"


class Settings:
    """Typed, lazy view of the app settings. Each property reads (and validates) on first access."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env: Mapping[str, str] = os.environ if env is None else env

    def raw(self, name: str) -> str:
        """The value (or default) of a registered setting; raises MissingSettingError if required and absent."""
        return _read(self._env, name)

    def integer(self, name: str, *, minimum: int | None = None) -> int:
        """A registered integer setting; a clear ConfigError naming it when invalid."""
        value = self.raw(name)
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"App setting {name!r} must be an integer, got {value!r}") from None
        if minimum is not None and number < minimum:
            raise ConfigError(f"App setting {name!r} must be >= {minimum}, got {number}")
        return number

    def flag(self, name: str) -> bool:
        """A registered true/false setting."""
        value = self.raw(name).strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"App setting {name!r} must be true or false, got {value!r}")

    # storage
    @property
    def storage_connection_string(self) -> str:
        return self.raw("AzureWebJobsStorage")

    @property
    def storage_queue_uri(self) -> str:
        return self.raw("AzureWebJobsStorage__queueServiceUri")

    @property
    def storage_table_uri(self) -> str:
        return self.raw("AzureWebJobsStorage__tableServiceUri")

    @property
    def storage_client_id(self) -> str:
        return self.raw("AzureWebJobsStorage__clientId")

    def require_storage(self) -> None:
        if not self.storage_connection_string and not (self.storage_queue_uri and self.storage_table_uri):
            raise MissingSettingError(
                "AzureWebJobsStorage",
                "set a connection string, or AzureWebJobsStorage__queueServiceUri and __tableServiceUri",
            )

    @property
    def table_prefix(self) -> str:
        value = self.raw("TABLE_PREFIX")
        if not value.isalnum() or not value[0].isalpha():
            raise ConfigError(f"TABLE_PREFIX must be letters and digits starting with a letter, got {value!r}")
        return value

    # graph
    @property
    def graph_tenant_id(self) -> str:
        return self.raw("GRAPH_TENANT_ID")

    @property
    def graph_client_id(self) -> str:
        return self.raw("GRAPH_CLIENT_ID")

    @property
    def graph_client_secret(self) -> str:
        return self.raw("GRAPH_CLIENT_SECRET")

    @property
    def graph_client_certificate_path(self) -> str:
        return self.raw("GRAPH_CLIENT_CERTIFICATE_PATH")

    @property
    def graph_authority(self) -> str:
        return f"{self.raw('GRAPH_AUTHORITY_HOST').rstrip('/')}/{self.graph_tenant_id}"

    @property
    def graph_base_url(self) -> str:
        return self.raw("GRAPH_BASE_URL").rstrip("/")

    @property
    def graph_scope(self) -> str:
        return self.raw("GRAPH_SCOPE")

    @property
    def graph_managed_identity_client_id(self) -> str:
        return self.raw("GRAPH_MANAGED_IDENTITY_CLIENT_ID")

    @property
    def graph_credential(self) -> ClientCredential:
        """The Graph app's credential: managed identity (federated) > certificate > secret.

        Only the setting that is used is read, so an unresolved reference in an unused one (a stale
        GRAPH_CLIENT_SECRET next to a managed identity) does not fail the app; /api/health still lists it.
        """
        identity = self.graph_managed_identity_client_id
        if identity:
            return ClientCredential(managed_identity_client_id=identity,
                                    federated_audience=self.raw("FEDERATED_TOKEN_AUDIENCE"))
        certificate = self.graph_client_certificate_path
        if certificate:
            return ClientCredential(certificate_path=certificate)
        secret = self.graph_client_secret
        if secret:
            return ClientCredential(secret=secret)
        raise MissingSettingError(
            "GRAPH_CLIENT_SECRET",
            "set GRAPH_MANAGED_IDENTITY_CLIENT_ID (federated credential), GRAPH_CLIENT_CERTIFICATE_PATH or a client "
            "secret for Graph",
        )

    def require_graph_credential(self) -> None:
        _ = self.graph_credential

    # dataverse
    @property
    def dataverse_url(self) -> str:
        return self.raw("DATAVERSE_URL").rstrip("/")

    @property
    def dataverse_tenant_id(self) -> str:
        return self.raw("DATAVERSE_TENANT_ID") or self.graph_tenant_id

    @property
    def dataverse_client_id(self) -> str:
        return self.raw("DATAVERSE_CLIENT_ID") or self.graph_client_id

    @property
    def dataverse_credential(self) -> ClientCredential:
        """Dataverse's own credential (certificate > secret) when it has one, else the Graph app's credential."""
        certificate = self.raw("DATAVERSE_CLIENT_CERTIFICATE_PATH")
        if certificate:
            return ClientCredential(certificate_path=certificate)
        secret = self.raw("DATAVERSE_CLIENT_SECRET")
        if secret:
            return ClientCredential(secret=secret)
        try:
            return self.graph_credential
        except UnresolvedReferenceError:
            raise
        except MissingSettingError:
            raise MissingSettingError(
                "DATAVERSE_CLIENT_SECRET",
                "set a credential for Dataverse (DATAVERSE_CLIENT_SECRET / _CERTIFICATE_PATH) or for Graph "
                "(GRAPH_MANAGED_IDENTITY_CLIENT_ID, GRAPH_CLIENT_CERTIFICATE_PATH, GRAPH_CLIENT_SECRET)",
            ) from None

    @property
    def dataverse_app_users(self) -> list[tuple[str, ClientCredential]]:
        """The application users Dataverse requests are spread over: (client id, credential) each.

        ``DATAVERSE_CLIENT_IDS`` names the pool (else ``DATAVERSE_CLIENT_ID`` alone); ``DATAVERSE_CLIENT_SECRETS``
        gives one secret per id in the same order, else each signs in with :attr:`dataverse_credential`."""
        ids = [i.strip() for i in self.raw("DATAVERSE_CLIENT_IDS").split(",") if i.strip()]
        if not ids:
            return [(self.dataverse_client_id, self.dataverse_credential)]
        if len({i.lower() for i in ids}) != len(ids):
            raise ConfigError("DATAVERSE_CLIENT_IDS names an app more than once")
        secrets = [x.strip() for x in self.raw("DATAVERSE_CLIENT_SECRETS").split(",")] \
            if self.raw("DATAVERSE_CLIENT_SECRETS") else []
        if secrets and len(secrets) != len(ids):
            raise ConfigError(f"DATAVERSE_CLIENT_SECRETS has {len(secrets)} secret(s) for {len(ids)} app id(s) in "
                              "DATAVERSE_CLIENT_IDS; give one per id, in the same order")
        if secrets:
            return [(i, ClientCredential(secret=x)) for i, x in zip(ids, secrets, strict=True)]
        credential = self.dataverse_credential
        return [(i, credential) for i in ids]

    def dataverse_budget_values(self) -> dict[str, float]:
        """The ``ServiceProtectionBudget`` fields from the DATAVERSE_USER_* / DATAVERSE_BUDGET_PERCENT settings."""
        percent = self.integer("DATAVERSE_BUDGET_PERCENT", minimum=1)
        if percent > 100:
            raise ConfigError(f"App setting 'DATAVERSE_BUDGET_PERCENT' must be <= 100, got {percent}")
        return {"requests": self.integer("DATAVERSE_USER_REQUESTS_PER_WINDOW", minimum=1),
                "window_s": self.integer("DATAVERSE_USER_WINDOW_SECONDS", minimum=1),
                "execution_ms": self.integer("DATAVERSE_USER_EXECUTION_MS", minimum=1),
                "concurrency": self.integer("DATAVERSE_USER_CONCURRENCY", minimum=1),
                "share": percent / 100, "headroom": 1.0}

    @property
    def dataverse_client_secret(self) -> str:
        return self.dataverse_credential.secret

    @property
    def dataverse_client_certificate_path(self) -> str:
        return self.dataverse_credential.certificate_path

    @property
    def dataverse_authority(self) -> str:
        explicit = self.raw("DATAVERSE_AUTHORITY")
        if explicit:
            return explicit.rstrip("/")
        return f"{self.raw('GRAPH_AUTHORITY_HOST').rstrip('/')}/{self.dataverse_tenant_id}"

    @property
    def dataverse_scope(self) -> str:
        return self.raw("DATAVERSE_SCOPE") or f"{self.dataverse_url}/.default"

    @property
    def dataverse_api_base(self) -> str:
        return f"{self.dataverse_url}/api/data/{self.raw('DATAVERSE_API_VERSION')}"

    # webhooks
    @property
    def webhook_base_url(self) -> str:
        value = self.raw("WEBHOOK_BASE_URL")
        if not value:
            raise MissingSettingError(
                "WEBHOOK_BASE_URL", "needed to create Graph subscriptions (the public URL of /api)"
            )
        return value.rstrip("/")

    @property
    def webhook_function_key(self) -> str:
        return self.raw("WEBHOOK_FUNCTION_KEY")

    @property
    def webhook_max_body_bytes(self) -> int:
        return self.integer("WEBHOOK_MAX_BODY_BYTES", minimum=1024)

    @property
    def log_level(self) -> str:
        return self.raw("LOG_LEVEL").upper()

    def unresolved(self) -> list[str]:
        """App settings whose value is still an unresolved Key Vault / App Configuration reference."""
        return unresolved_settings(self._env)

    def configured(self) -> dict[str, bool]:
        """Which dependencies are usable as configured (for the health endpoint; never values).

        A dependency whose setting is an unresolved Key Vault reference counts as *not* configured; the names are
        in :meth:`unresolved`.
        """

        def usable(check: Callable[[], object]) -> bool:
            try:
                return bool(check())
            except ConfigError:
                return False

        def webhooks() -> bool:
            _ = self.webhook_function_key  # an unresolved key would be sent to Graph as ?code=
            return bool(self.raw("WEBHOOK_BASE_URL"))

        return {
            "storage": usable(lambda: self.raw("AzureWebJobsStorage")
                              or self.raw("AzureWebJobsStorage__queueServiceUri")),
            "graph": usable(lambda: self.graph_tenant_id and self.graph_client_id and self.graph_credential),
            "dataverse": usable(lambda: self.dataverse_url and self.dataverse_client_id and self.dataverse_credential),
            "webhooks": usable(webhooks),
        }


@cache
def get_settings() -> Settings:
    """The process-wide settings view (reads the environment lazily, property by property)."""
    return Settings()


def reset_settings_cache() -> None:
    get_settings.cache_clear()
