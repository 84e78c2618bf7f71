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
    # Lifecycle (change-notifications-lifecycle-events): `reauthorizationRequired` when the access token the
    # subscription was authorised with is about to expire: `reauthorize_interval_s` after the last create/renew/
    # reauthorize (default one token lifetime, 60 min), repeated every `reauthorize_repeat_s` until the app acts;
    # unanswered for `reauthorize_pause_after_s`, change notifications pause (are lost) until it does. Also sent
    # `reauthorize_before_s` before expiry when set. None switches each part off. Plain expiry deletes silently.
    reauthorize_interval_s: float | None = 3600.0
    reauthorize_repeat_s: float = 900.0
    reauthorize_pause_after_s: float | None = 900.0
    reauthorize_before_s: float | None = None
    sweep_interval_s: float = 1.0
    # Slow endpoints (change-notifications-delivery-webhooks#throttling), off by default: a POST answered after
    # more than `slow_notification_ms` is slow; after `slow_min_notifications` per URL, >= 10 % slow delays that
    # URL's notifications by `slow_delay_s`, >= 15 % drops them (-> `missed`); counts reset every `slow_window_s`.
    slow_endpoint_throttling: bool = False
    slow_notification_ms: float = 2900.0
    slow_min_notifications: int = 100
    slow_throttle_ratio: float = 0.10
    slow_drop_ratio: float = 0.15
    slow_delay_s: float = 600.0
    slow_window_s: float = 600.0
    # throttling (per app id + mailbox, Outlook limits)
    budget_requests: int = 10_000
    budget_window_s: float = 600.0
    concurrency_per_mailbox: int = 4
    # subscription API (throttling-limits, subscription services): writes are POST/PATCH/PUT/DELETE
    subscription_window_s: float = 20.0
    subscription_writes_per_app: int = 1000
    subscription_writes_per_tenant: int = 2000
    subscription_requests_per_app: int = 5000
    subscription_requests_per_tenant: int = 10000
    # JSON $batch: items without dependsOn run concurrently; responses come back shuffled (the order is not
    # guaranteed, json-batching); a seed makes the shuffle reproducible
    batch_shuffle_responses: bool = True
    # paging and delta
    default_page_size: int = 10
    max_page_size: int = 1000
    delta_token_ttl_s: float = 7 * 24 * 3600.0
    delta_filter_cap: int = 5000  # `$filter` on delta returns at most this many messages (delta-query-messages)
    # Without `$orderby` the order is not guaranteed: the emulator shuffles each initial round (never newest
    # first). Chaos: each use of a delta/skip token fails with probability `delta_evict_probability` as an
    # evicted sync state (410 syncStateNotFound / resyncRequired / SyncStateInvalid, chosen at random).
    delta_evict_probability: float = 0.0
    shuffle_seed: int | None = None
    # attachments
    max_simple_attachment_bytes: int = 3 * 1024 * 1024
    max_upload_session_bytes: int = 150 * 1024 * 1024
    upload_session_ttl_s: float = 3600.0
    # each PUT's byte range must be smaller than 4 MB (outlook-large-attachments; the stricter decimal reading)
    max_upload_chunk_bytes: int = 4_000_000
    request_log_size: int = 200_000
    access_policies: dict[str, list[str]] = field(default_factory=dict)  # app id -> allowed UPNs/addresses
    # Exchange RBAC for Applications: app id -> [{"role": "Application Mail.ReadWrite", "scope": [mailboxes|"*"]}].
    # These grants live in Exchange: the token carries no Mail.* roles for them (auth-limit-mailbox-access).
    role_assignments: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def outbox_dir(self) -> Path | None:
        return self.state_dir / "outbox" if self.state_dir is not None else None
