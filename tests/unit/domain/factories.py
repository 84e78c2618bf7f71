"""Plain-data builders shared by the domain tests (no fakes needed: the domain is pure)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from core.domain.model import (
    Address,
    CrmRecordRef,
    CrmTable,
    Folder,
    FolderKind,
    Headers,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    MailMessage,
    OrgEmailSettings,
    PartyCandidate,
    TrackingFilter,
)

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def ref(table: str, n: int) -> CrmRecordRef:
    return CrmRecordRef(table, uuid.UUID(int=n))


ALICE = ref(CrmTable.SYSTEMUSER, 1)  # alice@contoso.com, a router user
BOB = ref(CrmTable.SYSTEMUSER, 2)  # bob@contoso.com
SUPPORT_Q = ref(CrmTable.QUEUE, 10)  # support@contoso.com
CAROL_CONTACT = ref(CrmTable.CONTACT, 100)  # carol@fabrikam.com
FABRIKAM_ACCOUNT = ref(CrmTable.ACCOUNT, 200)
LEAD = ref(CrmTable.LEAD, 300)
CASE = ref("incident", 400)


def addr(address: str, name: str = "") -> Address:
    return Address.of(name, address)


def message(**overrides: Any) -> MailMessage:
    values: dict[str, Any] = {
        "mailbox": "alice@contoso.com",
        "graph_id": "AAMk-1",
        "folder": Folder(FolderKind.INBOX, "inbox-id"),
        "internet_message_id": "<m1@fabrikam.com>",
        "subject": "Order 1234",
        "from_": addr("carol@fabrikam.com", "Carol Jones"),
        "to": (addr("alice@contoso.com", "Alice"),),
        "received_at": NOW,
        "sent_at": NOW,
        "body_html": "<p>Hello</p>",
    }
    headers = overrides.pop("headers", None)
    if headers is not None:
        values["headers"] = Headers(tuple(headers))
    values.update(overrides)
    return MailMessage(**values)


def user_mailbox(**overrides: Any) -> MailboxConfig:
    values: dict[str, Any] = {
        "address": "alice@contoso.com",
        "kind": MailboxKind.USER,
        "owner": ALICE,
        "mailbox_id": uuid.UUID(int=9001),
        "inbound_method": InboundMethod.INDIVIDUAL,
        "tracking_filter": TrackingFilter.ALL,
    }
    values.update(overrides)
    return MailboxConfig(**values)


def queue_mailbox(**overrides: Any) -> MailboxConfig:
    values: dict[str, Any] = {
        "address": "support@contoso.com",
        "kind": MailboxKind.QUEUE,
        "owner": SUPPORT_Q,
        "mailbox_id": uuid.UUID(int=9010),
        "inbound_method": InboundMethod.INDIVIDUAL,
        "tracking_filter": TrackingFilter.ALL,
        "queue_owner": BOB,
    }
    values.update(overrides)
    return MailboxConfig(**values)


def org(**overrides: Any) -> OrgEmailSettings:
    values: dict[str, Any] = {"internal_domains": frozenset({"contoso.com"})}
    values.update(overrides)
    return OrgEmailSettings(**values)


def directory() -> dict[str, list[PartyCandidate]]:
    return {
        "alice@contoso.com": [PartyCandidate(ALICE)],
        "bob@contoso.com": [PartyCandidate(BOB)],
        "support@contoso.com": [PartyCandidate(SUPPORT_Q, owner=BOB)],
        "carol@fabrikam.com": [PartyCandidate(CAROL_CONTACT, owner=BOB)],
        "info@fabrikam.com": [PartyCandidate(FABRIKAM_ACCOUNT, owner=ALICE)],
        "lead@prospect.com": [PartyCandidate(LEAD, owner=ALICE)],
    }
