"""Typed configuration, read lazily from app settings (environment variables).

One place for every setting the product reads. Nothing here runs at import time that can fail:
``get_settings()`` reads the environment on first use and caches the result; a missing required
setting raises :class:`MissingSettingError` naming it, at the moment a component needs it.

The registry ``SETTINGS`` is the single source for the README's settings table and for the
infrastructure drift test (every setting read here appears in ``infra/`` or is optional).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Final

__all__ = [
    "SETTINGS",
    "ConfigError",
    "MissingSettingError",
    "Setting",
    "Settings",
    "get_settings",
    "reset_settings_cache",
]

VERSION: Final = "0.1.0"


class ConfigError(RuntimeError):
    """A setting is missing or has an invalid value."""


class MissingSettingError(ConfigError):
    def __init__(self, name: str, meaning: str) -> None:
        super().__init__(f"Missing required app setting {name!r}: {meaning}")
        self.setting = name


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
    Setting("MAILBOX_HEALTH_SCHEDULE", "0 */5 * * * *",
            "How often mailboxes due for a health probe are looked at (each mailbox backs off on its own)."),
    # Pipelines (engineering knobs; admin-facing behaviour lives in the OrgSettings table)
    Setting("CRM_PARTY_CACHE_SECONDS", "120", "How long resolved sender/recipient lookups are cached per instance."),
    Setting("CRM_CORRELATION_DAYS", "90",
            "Correlation looks at CRM emails created this many days back (0 = no bound), like SSS smart matching."),
    Setting("INBOUND_MAX_ATTEMPTS", "20",
            "Transient failures of one inbound message before it is recorded as failed and poisoned."),
    Setting("INBOUND_MAX_RETRY_DELAY_SECONDS", "900", "Longest visibility delay when an inbound item is retried."),
    Setting("SUBSCRIPTION_LIFETIME_MINUTES", "4200",
            "Requested Graph subscription lifetime (<= 4230 is safe everywhere, reference/graph.md §1.4)."),
    Setting("SUBSCRIPTION_RENEW_BEFORE_MINUTES", "1440", "Renew subscriptions expiring within this many minutes."),
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
    return value


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

    def require_graph_credential(self) -> None:
        if not self.graph_client_secret and not self.graph_client_certificate_path:
            raise MissingSettingError(
                "GRAPH_CLIENT_SECRET", "set a client secret or GRAPH_CLIENT_CERTIFICATE_PATH for Graph"
            )

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
    def dataverse_client_secret(self) -> str:
        if self.raw("DATAVERSE_CLIENT_CERTIFICATE_PATH"):
            return self.raw("DATAVERSE_CLIENT_SECRET")
        return self.raw("DATAVERSE_CLIENT_SECRET") or self.graph_client_secret

    @property
    def dataverse_client_certificate_path(self) -> str:
        if self.raw("DATAVERSE_CLIENT_SECRET"):
            return self.raw("DATAVERSE_CLIENT_CERTIFICATE_PATH")
        return self.raw("DATAVERSE_CLIENT_CERTIFICATE_PATH") or self.graph_client_certificate_path

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

    def configured(self) -> dict[str, bool]:
        """Which dependencies are configured (for the health endpoint; never values)."""
        env = self._env
        return {
            "storage": bool(env.get("AzureWebJobsStorage") or env.get("AzureWebJobsStorage__queueServiceUri")),
            "graph": bool(env.get("GRAPH_TENANT_ID") and env.get("GRAPH_CLIENT_ID")
                          and (env.get("GRAPH_CLIENT_SECRET") or env.get("GRAPH_CLIENT_CERTIFICATE_PATH"))),
            "dataverse": bool(env.get("DATAVERSE_URL")),
            "webhooks": bool(env.get("WEBHOOK_BASE_URL")),
        }


@cache
def get_settings() -> Settings:
    """The process-wide settings view (reads the environment lazily, property by property)."""
    return Settings()


def reset_settings_cache() -> None:
    get_settings.cache_clear()
