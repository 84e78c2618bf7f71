"""Fakes of the outbound ports (our own Protocols) plus contract tests that keep the fakes honest.

Faults: every fake takes ``fail(method, exc, after=False)``: the next call of ``method`` raises ``exc`` — before
doing anything, or (``after=True``) after the call's effect happened (a crash/lost response after success).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.domain.model import (
    ApprovalStatus,
    CrmRecordRef,
    MailboxConfig,
    MailboxKind,
    OutboundMethod,
)
from core.domain.outbound import CrmOutboundEmail, OutboundAttachment, OutboundParty, OutboundStatus
from core.domain.parties import ParticipationType
from core.services.outbound import ActiveMarker, LedgerConflict, LedgerEntry, Phase
from core.services.outbound_crm import ClaimLost, CrmEmailState, LoadedEmail

T0 = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)


class Faults:
    def __init__(self) -> None:
        self._before: dict[str, list[BaseException]] = defaultdict(list)
        self._after: dict[str, list[BaseException]] = defaultdict(list)
        self.calls: dict[str, int] = defaultdict(int)

    def fail(self, method: str, exc: BaseException, *, after: bool = False, times: int = 1) -> None:
        (self._after if after else self._before)[method].extend([exc] * times)

    def before(self, method: str) -> None:
        self.calls[method] += 1
        if self._before[method]:
            raise self._before[method].pop(0)

    def after(self, method: str) -> None:
        if self._after[method]:
            raise self._after[method].pop(0)


class WorkerCrash(BaseException):
    """Stands for the process dying mid-call: not an Exception, so no handler in the service catches it."""


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


# ------------------------------------------------------------------------------------------------ CRM


@dataclass
class FakeEmail:
    email: CrmOutboundEmail
    sender: CrmRecordRef | None
    statecode: int = 1
    statuscode: int = 6
    version: int = 1
    attempts: int = 0
    message_id: str | None = None
    modified_on: datetime = T0
    parent_id: uuid.UUID | None = None
    attachment_bodies: dict[uuid.UUID, bytes] = field(default_factory=dict)

    @property
    def status(self) -> OutboundStatus | None:
        return next((s for s in OutboundStatus if s.crm == (self.statecode, self.statuscode)), None)


class FakeCrm:
    """In-memory ``OutboundCrmGateway`` with Dataverse's rules that matter here: ETags per version, Pending
    Send/Sending/Sent read-only except status (so attempts are only written at Failed, messageid never)."""

    def __init__(self) -> None:
        self.emails: dict[uuid.UUID, FakeEmail] = {}
        self.faults = Faults()
        self.history: list[tuple[uuid.UUID, str]] = []

    def add(self, email: CrmOutboundEmail, sender: CrmRecordRef | None, *, status: OutboundStatus =
            OutboundStatus.PENDING_SEND, modified_on: datetime = T0,
            bodies: Mapping[uuid.UUID, bytes] | None = None) -> FakeEmail:
        state, code = status.crm
        row = FakeEmail(email, sender, state, code, modified_on=modified_on, attachment_bodies=dict(bodies or {}))
        self.emails[email.activity_id] = row
        return row

    def _state(self, row: FakeEmail) -> CrmEmailState:
        return CrmEmailState(row.email.activity_id, row.statecode, row.statuscode, f'W/"{row.version}"',
                             row.attempts, row.modified_on, row.sender, None, row.message_id)

    def _set(self, row: FakeEmail, status: OutboundStatus, what: str) -> None:
        row.statecode, row.statuscode = status.crm
        row.version += 1
        self.history.append((row.email.activity_id, what))

    async def _rows(self, status: OutboundStatus, max_rows: int) -> AsyncIterator[CrmEmailState]:
        self.faults.before("list")
        rows = sorted((r for r in self.emails.values() if r.status is status), key=lambda r: r.modified_on)
        for row in rows[:max_rows]:
            await asyncio.sleep(0)
            yield self._state(row)

    def list_pending(self, *, max_rows: int) -> AsyncIterator[CrmEmailState]:
        return self._rows(OutboundStatus.PENDING_SEND, max_rows)

    def list_sending(self, *, max_rows: int) -> AsyncIterator[CrmEmailState]:
        return self._rows(OutboundStatus.SENDING, max_rows)

    async def get_state(self, email_id: uuid.UUID) -> CrmEmailState | None:
        row = self.emails.get(email_id)
        return self._state(row) if row else None

    async def load(self, email_id: uuid.UUID) -> LoadedEmail | None:
        self.faults.before("load")
        await asyncio.sleep(0)  # let a concurrent worker interleave
        row = self.emails.get(email_id)
        return LoadedEmail(self._state(row), row.email, row.parent_id) if row else None

    async def load_attachment(self, attachment_id: uuid.UUID) -> bytes:
        self.faults.before("load_attachment")
        for row in self.emails.values():
            if attachment_id in row.attachment_bodies:
                return row.attachment_bodies[attachment_id]
        raise KeyError(attachment_id)

    async def set_status(self, email_id: uuid.UUID, status: OutboundStatus, *, etag: str | None) -> str | None:
        self.faults.before(f"set_status:{status.value}")
        await asyncio.sleep(0)
        row = self.emails[email_id]
        if etag is not None and etag != f'W/"{row.version}"':
            raise ClaimLost("etag mismatch")
        self._set(row, status, status.value)
        self.faults.after(f"set_status:{status.value}")
        return f'W/"{row.version}"'

    async def mark_sent(self, email_id: uuid.UUID) -> None:
        self.faults.before("mark_sent")
        row = self.emails[email_id]
        if row.status is not OutboundStatus.SENT:
            self._set(row, OutboundStatus.SENT, "sent")
        self.faults.after("mark_sent")

    async def mark_failed(self, email_id: uuid.UUID, *, delivery_attempts: int) -> None:
        self.faults.before("mark_failed")
        row = self.emails[email_id]
        if row.status is not OutboundStatus.SENT:
            row.attempts = delivery_attempts
            self._set(row, OutboundStatus.FAILED, "failed")


# ------------------------------------------------------------------------------------------------ ledger


class FakeLedger:
    """In-memory ``OutboundLedger`` with ETag semantics like Azure Tables."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[LedgerEntry, int]] = {}
        self.markers: dict[str, ActiveMarker] = {}

    async def get(self, email_id: str) -> tuple[LedgerEntry, str] | None:
        await asyncio.sleep(0)
        found = self.entries.get(email_id)
        return (found[0], str(found[1])) if found else None

    async def put(self, entry: LedgerEntry, *, etag: str | None) -> str:
        current = self.entries.get(entry.email_id)
        if etag is None:
            if current is not None:
                raise LedgerConflict("exists")
            version = 1
        else:
            if current is None or str(current[1]) != etag:
                raise LedgerConflict("etag mismatch")
            version = current[1] + 1
        self.entries[entry.email_id] = (entry, version)
        return str(version)

    async def mark_active(self, marker: ActiveMarker) -> None:
        self.markers[marker.email_id] = marker

    async def list_active(self) -> Sequence[ActiveMarker]:
        return list(self.markers.values())

    async def clear_active(self, email_id: str) -> None:
        self.markers.pop(email_id, None)

    def entry(self, email_id: uuid.UUID | str) -> LedgerEntry:
        return self.entries[str(email_id)][0]


# ------------------------------------------------------------------------------------------------ Graph


class FakeMail:
    """In-memory ``MailSender``: drafts keep their (immutable) id when sent and move to Sent Items."""

    def __init__(self, *, keeps_chosen_message_id: bool = True) -> None:
        self.messages: dict[str, dict[str, Any]] = {}
        self.outbox: list[dict[str, Any]] = []
        self.uploads: list[tuple[str, str, int]] = []
        self.upload_details: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.faults = Faults()
        self.keeps_chosen_message_id = keeps_chosen_message_id  # False: Exchange ignores a chosen id
        self._n = 0

    async def create_draft(self, mailbox: str, message: Mapping[str, Any]) -> dict[str, Any]:
        self.faults.before("create_draft")
        self._n += 1
        chosen = message.get("internetMessageId") if self.keeps_chosen_message_id else None
        msg = {"id": f"draft-{self._n}", "internetMessageId": chosen or f"<m{self._n}@fake.example>", "isDraft": True,
               "mailbox": mailbox, "folder": "drafts", "message": dict(message)}
        self.messages[msg["id"]] = msg
        self.faults.after("create_draft")
        return {k: msg[k] for k in ("id", "internetMessageId", "isDraft")}

    async def upload_large_attachment(self, mailbox: str, message_id: str, *, name: str, content_type: str,
                                      data: bytes, is_inline: bool = False, content_id: str | None = None) -> None:
        self.faults.before("upload")
        self.uploads.append((message_id, name, len(data)))
        self.upload_details.append({"name": name, "isInline": is_inline, "contentId": content_id})

    async def send_draft(self, mailbox: str, draft_id: str) -> None:
        self.faults.before("send_draft")
        msg = self.messages[draft_id]
        assert msg["isDraft"], "sending a message that is not a draft"
        msg["isDraft"], msg["folder"] = False, "sentitems"
        self.outbox.append(msg)
        self.faults.after("send_draft")

    async def find_messages_by_internet_id(self, mailbox: str, internet_message_id: str, *,
                                           folder: str | None = None) -> list[dict[str, Any]]:
        self.faults.before("find")
        return [{k: m[k] for k in ("id", "internetMessageId", "isDraft")} for m in self.messages.values()
                if m["mailbox"] == mailbox and m["internetMessageId"] == internet_message_id
                and (folder is None or m["folder"] == folder)]

    async def delete_message(self, mailbox: str, message_id: str) -> None:
        self.faults.before("delete")
        if self.messages.pop(message_id, None) is not None:
            self.deleted.append(message_id)

    def sent_for(self, email_id: uuid.UUID) -> list[dict[str, Any]]:
        marker = str(email_id)
        return [m for m in self.outbox
                if any(h["value"] == marker for h in m["message"].get("internetMessageHeaders", []))]


# ------------------------------------------------------------------------------------------------ the rest


class FakeStatus:
    def __init__(self) -> None:
        self.failures: list[tuple[str, str, str]] = []
        self.sent: list[tuple[str, str]] = []

    async def record_failure(self, mailbox: str, email_id: str, reason: str, at: datetime) -> None:
        self.failures.append((mailbox, email_id, reason))

    async def record_sent(self, mailbox: str, email_id: str, at: datetime) -> None:
        self.sent.append((mailbox, email_id))


class RecordingQueue:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int]] = []

    async def send_many(self, queue: str, messages: Sequence[str], *, delay_seconds: int = 0) -> None:
        self.sent.extend((queue, m, delay_seconds) for m in messages)

    def drain(self) -> list[tuple[str, int]]:
        out = [(m, d) for _, m, d in self.sent]
        self.sent.clear()
        return out


def user_ref(n: int) -> CrmRecordRef:
    return CrmRecordRef("systemuser", uuid.UUID(int=n))


def router_mailbox(n: int, **overrides: Any) -> MailboxConfig:
    values: dict[str, Any] = {
        "address": f"user{n}@contoso.example", "kind": MailboxKind.USER, "owner": user_ref(n),
        "outbound_method": OutboundMethod.ROUTER, "approval": ApprovalStatus.APPROVED,
    }
    values.update(overrides)
    return MailboxConfig(**values)


def outbound_email(sender: int, *, subject: str = "Quote CRM:0001001", to: str = "fiona@fabrikam.example",
                   attachments: tuple[OutboundAttachment, ...] = (), n: int | None = None) -> CrmOutboundEmail:
    return CrmOutboundEmail(
        activity_id=uuid.uuid4() if n is None else uuid.UUID(int=10_000 + n),
        subject=subject,
        description_html="<p>Hello</p>",
        parties=(
            OutboundParty(ParticipationType.SENDER, user_ref(sender), f"user{sender}@contoso.example"),
            OutboundParty(ParticipationType.TO, CrmRecordRef("contact", uuid.UUID(int=99)), to, "Fiona"),
        ),
        attachments=attachments,
        tracking_token="CRM:0001001",
    )


# ------------------------------------------------------------------------------------------------ contract tests


async def test_fake_ledger_put_is_conditional() -> None:
    ledger = FakeLedger()
    entry = LedgerEntry("e1", "a@x", Phase.CLAIMED)
    etag = await ledger.put(entry, etag=None)
    with pytest.raises(LedgerConflict):
        await ledger.put(entry, etag=None)
    etag2 = await ledger.put(replace(entry, phase=Phase.DRAFT), etag=etag)
    with pytest.raises(LedgerConflict):
        await ledger.put(replace(entry, phase=Phase.SENT), etag=etag)
    got = await ledger.get("e1")
    assert got is not None and got[0].phase is Phase.DRAFT and got[1] == etag2


async def test_fake_crm_claim_needs_current_etag() -> None:
    crm = FakeCrm()
    row = crm.add(outbound_email(1), user_ref(1))
    state = await crm.get_state(row.email.activity_id)
    assert state is not None and state.status is OutboundStatus.PENDING_SEND
    await crm.set_status(row.email.activity_id, OutboundStatus.SENDING, etag=state.etag)
    with pytest.raises(ClaimLost):
        await crm.set_status(row.email.activity_id, OutboundStatus.SENDING, etag=state.etag)
