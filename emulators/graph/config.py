"""Settings of one Graph emulator instance (CLI flags and test options map onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulators.common import demo

__all__ = ["GraphConfig"]


@dataclass
class GraphConfig:
    """Everything tunable. Defaults mirror Exchange Online; tests shorten the time-based ones.

    ``identity_url`` is the identity emulator's base URL (tokens are validated against its JWKS);
    ``jwks`` short-circuits the fetch. ``auth=False`` is only for unit tests of the store/API without
    tokens: every request then acts as an app holding ``unauthenticated_roles``.
    """

    tenant_id: str = demo.TENANT_ID
    identity_url: str = ""
    ca_bundle: str | None = None
    jwks: dict[str, Any] | None = None
    auth: bool = True
    unauthenticated_roles: frozenset[str] = frozenset(
        {"Mail.Read", "Mail.ReadWrite", "Mail.Send", "MailboxSettings.ReadWrite", "User.Read.All"}
    )
    state_dir: Path | None = None  # None: SQLite in memory, outbox .eml files in a temporary directory
    seed: dict[str, Any] | None = None  # None: the default demo seed (emulators/graph/seed.py)
    # SMTP: inbound listener port (None: no listener) and an optional smarthost for external mail
    smtp_host: str = "127.0.0.1"
    smtp_port: int | None = None
    smarthost: tuple[str, int] | None = None
    public_url: str | None = None  # base for absolute links; default: the request's own scheme://host:port
    # subscriptions
    max_subscription_minutes: int = 10070
    min_subscription_minutes: int = 45  # shorter requested lifetimes are raised to this (documented)
    subscriptions_per_mailbox: int = 1000
    validation_timeout_s: float = 10.0
    revalidate_on_renew: bool = False
    allow_http_loopback: bool = True  # documented deviation: http:// only for 127.0.0.1/localhost/::1
    # notifications
    notification_timeout_s: float = 3.0
    notification_retry_window_s: float = 4 * 3600.0
    notification_retry_base_s: float = 2.0
    notification_retry_max_s: float = 300.0
    notification_batch_max: int = 100
    notification_concurrency_per_url: int = 4
    missed_after_s: float = 30.0  # after a dropped notification, a `missed` lifecycle event follows
    reauthorize_before_s: float | None = None  # send `reauthorizationRequired` this long before expiry
    sweep_interval_s: float = 1.0
    # throttling (per app id + mailbox, Outlook limits)
    budget_requests: int = 10_000
    budget_window_s: float = 600.0
    concurrency_per_mailbox: int = 4
    # paging and delta
    default_page_size: int = 10
    max_page_size: int = 1000
    delta_token_ttl_s: float = 7 * 24 * 3600.0
    # attachments
    max_simple_attachment_bytes: int = 3 * 1024 * 1024
    max_upload_session_bytes: int = 150 * 1024 * 1024
    upload_session_ttl_s: float = 3600.0
    request_log_size: int = 200_000
    access_policies: dict[str, list[str]] = field(default_factory=dict)  # app id -> allowed UPNs/addresses
    # Exchange RBAC for Applications: app id -> [{"role": "Application Mail.ReadWrite", "scope": [mailboxes|"*"]}].
    # These grants live in Exchange: the token carries no Mail.* roles for them (auth-limit-mailbox-access).
    role_assignments: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def outbox_dir(self) -> Path | None:
        return self.state_dir / "outbox" if self.state_dir is not None else None
