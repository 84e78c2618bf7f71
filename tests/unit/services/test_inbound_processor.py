"""Inbound processor over fakes of our own ports: exactly-once write, ledger, duplicates, transient vs permanent,
forward sinks, poison recording. (Foreign APIs are emulated in tests/integration/test_inbound_pipeline.py.)"""

from __future__ import annotations

import base64
import json
import uuid
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.adapters.dataverse import BadRequestError, ThrottledError, TransientError
from core.adapters.graph import AttachmentContents, GraphAccessDenied, GraphNotFound, GraphThrottled
from core.domain.correlation import CorrelationKeys, CorrelationLookup, KnownEmail
from core.domain.identity import activity_id_for
from core.domain.inbound import TrackEmail
from core.domain.model import (
    ApprovalStatus,
    CrmRecordRef,
    CrmTable,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    OrgEmailSettings,
    PartyCandidate,
    TrackingFilter,
)
from core.names import INBOUND_QUEUE
from core.services.inbound import (
    MAX_DEQUEUE_COUNT,
    InboundOptions,
    InboundProcessor,
    LedgerEntry,
    LedgerOutcome,
    folder_kind_of,
)
from core.services.inbound_crm import AttachmentRejected, CrmLookup, WriteOutcome
from core.settings.rows import RouterSettings
from core.work_items import InboundItem
from tests.fakes import StaticMailboxDirectory

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
ALICE = CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=1))
BOB = CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=2))
DAVE = CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=4))
CAROL = CrmRecordRef(CrmTable.CONTACT, uuid.UUID(int=100))


# ------------------------------------------------------------------------------------------------ fakes


class FakeMail:
    """``MailGateway`` over a dict of Graph message JSON; ``fail`` queues exceptions per operation."""

    def __init__(self) -> None:
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}
        self.contents: dict[tuple[str, str, str], bytes] = {}  # file attachments listed by metadata only
        self.content_requests: list[list[str]] = []
        self.attachment_mime: dict[tuple[str, str, str], bytes] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.categories: dict[tuple[str, str], list[str]] = {}
        self.deleted: list[tuple[str, str]] = []
        self.moved: dict[tuple[str, str], str] = {}
        self.fail: dict[str, list[Exception]] = defaultdict(list)

    def _maybe_fail(self, op: str) -> None:
        if self.fail[op]:
            raise self.fail[op].pop(0)

    async def get_message(self, mailbox: str, message_id: str, *, with_attachments: bool = True) -> dict[str, Any]:
        self.calls.append(("get_message", mailbox, message_id))
        self._maybe_fail("get_message")
        try:
            return json.loads(json.dumps(self.messages[(mailbox, message_id)]))
        except KeyError:
            raise GraphNotFound(404, "ErrorItemNotFound", "not found") from None

    async def get_attachment_mime(self, mailbox: str, message_id: str, attachment_id: str) -> bytes:
        self.calls.append(("get_attachment_mime", mailbox, message_id))
        return self.attachment_mime[(mailbox, message_id, attachment_id)]

    async def get_attachment_contents(self, mailbox: str, message_id: str,
                                      attachments: Sequence[Mapping[str, Any]]) -> AttachmentContents:
        self.calls.append(("get_attachment_contents", mailbox, message_id))
        self.content_requests.append([str(a["id"]) for a in attachments])
        return AttachmentContents([{**a, "contentBytes": self.contents[(mailbox, message_id, str(a["id"]))]}
                                   for a in attachments], 1)

    async def set_categories(self, mailbox: str, message_id: str, categories: Sequence[str]) -> None:
        self.calls.append(("set_categories", mailbox, message_id))
        self._maybe_fail("set_categories")
        self.categories[(mailbox, message_id)] = list(categories)

    async def delete_message(self, mailbox: str, message_id: str) -> None:
        self.calls.append(("delete_message", mailbox, message_id))
        self.deleted.append((mailbox, message_id))

    async def ensure_child_folder(self, mailbox: str, parent: str, display_name: str) -> str:
        self.calls.append(("ensure_child_folder", mailbox, display_name))
        return f"{parent}/{display_name}"

    async def move_message(self, mailbox: str, message_id: str, destination_id: str) -> dict[str, Any]:
        self.calls.append(("move_message", mailbox, message_id))
        self._maybe_fail("move_message")
        self.moved[(mailbox, message_id)] = destination_id
        return {"id": message_id}


class FakeCrm:
    """``InboundCrmGateway`` over an in-memory CRM: emails by activity id, a party directory."""

    def __init__(self, directory: Mapping[str, Sequence[PartyCandidate]] | None = None) -> None:
        self.directory = {k: tuple(v) for k, v in (directory or {}).items()}
        self.emails: dict[uuid.UUID, TrackEmail] = {}
        self.lookups = 0
        self.writes = 0
        self.fail_write: list[Exception] = []
        self.fail_lookup: list[Exception] = []
        self.max_attachment_bytes: int | None = None
        self.by_message_id: dict[str, KnownEmail] = {}  # emails CRM has by messageid (not written by us)
        self.asked: list[CorrelationKeys] = []

    async def lookup(self, addresses: Collection[str], keys: CorrelationKeys) -> CrmLookup:
        self.lookups += 1
        self.asked.append(keys)
        if self.fail_lookup:
            raise self.fail_lookup.pop(0)
        found = {a: self.directory.get(a, ()) for a in addresses}
        # CRM finds by messageid what anyone wrote, the router's own earlier writes included (a crash or a lost
        # ledger entry must not hide them from the loop guard).
        written = {e.message_id: KnownEmail(e.activity_id, regarding=e.regarding, owner=e.owner)
                   for e in self.emails.values()}
        known = {**written, **self.by_message_id}
        hits = {k: known[k] for k in keys.message_ids if k in known}
        return CrmLookup(found, CorrelationLookup(hits, {}, {}), requests=1)

    async def write(self, plan: TrackEmail) -> WriteOutcome:
        self.writes += 1
        if self.fail_write:
            raise self.fail_write.pop(0)
        if self.max_attachment_bytes is not None:
            for attachment in plan.attachments:
                if len(attachment.content) > self.max_attachment_bytes:
                    raise AttachmentRejected(attachment.filename, len(attachment.content))
        if plan.activity_id in self.emails:
            return WriteOutcome.ALREADY_TRACKED
        self.emails[plan.activity_id] = plan
        return WriteOutcome.CREATED


class FakeLedger:
    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], LedgerEntry] = {}

    async def get(self, mailbox: str, graph_id: str) -> LedgerEntry | None:
        return self.entries.get((mailbox, graph_id))

    async def put(self, entry: LedgerEntry) -> None:
        self.entries[(entry.mailbox, entry.graph_id)] = entry


class FakeDecisions:
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], dict[str, Any]] = {}

    async def record(self, mailbox: str, graph_id: str, record: Mapping[str, Any]) -> None:
        json.dumps(record, default=str)  # must be JSON-able (the table adapter stores it as JSON)
        self.records[(mailbox, graph_id)] = dict(record)


class FakeStatus:
    def __init__(self) -> None:
        self.failures: list[tuple[str, str, bool]] = []

    async def record_failure(self, mailbox: str, *, code: str, reason: str, permanent: bool) -> None:
        self.failures.append((mailbox, code, permanent))


class FakePoison:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    async def record(self, *, queue: str, message: str, dequeue_count: int, reason: str) -> None:
        self.rows.append({"queue": queue, "message": message, "dequeue_count": dequeue_count, "reason": reason})


class DelayQueue:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int]] = []

    async def send_many(self, queue: str, messages: Sequence[str], *, delay_seconds: int = 0) -> None:
        self.sent.extend((queue, m, delay_seconds) for m in messages)


# ------------------------------------------------------------------------------------------------ builders


def user(address: str, owner: CrmRecordRef, **overrides: Any) -> MailboxConfig:
    values: dict[str, Any] = {"address": address, "kind": MailboxKind.USER, "owner": owner,
                              "mailbox_id": uuid.UUID(int=owner.id.int + 9000),
                              "inbound_method": InboundMethod.INDIVIDUAL, "tracking_filter": TrackingFilter.ALL}
    values.update(overrides)
    return MailboxConfig(**values)


SINK = MailboxConfig(address="crm-sink@contoso.com", kind=MailboxKind.FORWARD_SINK, delete_after_processing=True)


def graph_message(graph_id: str, *, mid: str = "<m1@fabrikam.com>", sender: str = "carol@fabrikam.com",
                  to: Sequence[str] = ("alice@contoso.com",), subject: str = "Order 1234",
                  attachments: list[dict[str, Any]] | None = None, headers: list[dict[str, str]] | None = None,
                  categories: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "id": graph_id, "internetMessageId": mid, "subject": subject,
        "from": {"emailAddress": {"name": "Carol", "address": sender}},
        "sender": {"emailAddress": {"name": "Carol", "address": sender}},
        "toRecipients": [{"emailAddress": {"name": "", "address": a}} for a in to],
        "receivedDateTime": "2026-03-02T11:59:00Z", "sentDateTime": "2026-03-02T11:58:00Z",
        "body": {"contentType": "html", "content": "<p>Hello</p>"}, "isDraft": False,
        "internetMessageHeaders": headers or [], "categories": list(categories),
        "attachments": attachments or [], "hasAttachments": bool(attachments),
    }


@dataclass
class World:
    mail: FakeMail = field(default_factory=FakeMail)
    crm: FakeCrm = field(default_factory=lambda: FakeCrm({
        "alice@contoso.com": (PartyCandidate(ALICE),), "bob@contoso.com": (PartyCandidate(BOB),),
        "dave@contoso.com": (PartyCandidate(DAVE),), "carol@fabrikam.com": (PartyCandidate(CAROL, owner=ALICE),)}))
    ledger: FakeLedger = field(default_factory=FakeLedger)
    decisions: FakeDecisions = field(default_factory=FakeDecisions)
    status: FakeStatus = field(default_factory=FakeStatus)
    poison: FakePoison = field(default_factory=FakePoison)
    queue: DelayQueue = field(default_factory=DelayQueue)
    mailboxes: list[MailboxConfig] = field(default_factory=lambda: [
        user("alice@contoso.com", ALICE), user("bob@contoso.com", BOB),
        user("olga@contoso.com", CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=5)),
             inbound_method=InboundMethod.OUTLOOK),
        user("dave@contoso.com", DAVE, inbound_method=InboundMethod.FORWARD,
             forward_sink_address="crm-sink@contoso.com"),
        SINK])
    org: OrgEmailSettings = field(default_factory=lambda: OrgEmailSettings(internal_domains=frozenset({"contoso.com"})))
    options: InboundOptions = field(default_factory=InboundOptions)
    router: RouterSettings = field(default_factory=RouterSettings)

    def processor(self) -> InboundProcessor:
        return InboundProcessor(
            mail=self.mail, crm=self.crm, mailboxes=StaticMailboxDirectory(self.mailboxes, self.org, self.router),
            ledger=self.ledger, decisions=self.decisions, status=self.status, poison=self.poison,
            queue=self.queue, options=self.options, clock=lambda: NOW)


def item(mailbox: str, graph_id: str, source: str = "notification", folder: str = "inbox") -> InboundItem:
    return InboundItem(mailbox, graph_id, source, folder=folder)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ tests


async def test_tracks_a_message_once_with_a_deterministic_activity_id() -> None:
    w = World()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    result = await w.processor().process(item("alice@contoso.com", "g1"))

    assert result.outcome == "tracked"
    expected = activity_id_for("<m1@fabrikam.com>")
    assert result.activity_id == str(expected)
    assert list(w.crm.emails) == [expected]
    plan = w.crm.emails[expected]
    assert plan.owner == ALICE
    assert [p.record for p in plan.parties.parties] == [CAROL, ALICE]
    assert w.ledger.entries[("alice@contoso.com", "g1")].outcome is LedgerOutcome.TRACKED
    record = w.decisions.records[("alice@contoso.com", "g1")]
    assert record["outcome"] == "tracked" and record["activityId"] == str(expected)
    assert [c[0] for c in w.mail.calls] == ["get_message"]  # no category by default: one Graph call


async def test_redelivered_item_is_answered_from_the_ledger_without_refetching() -> None:
    w = World()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    processor = w.processor()
    first = await processor.process(item("alice@contoso.com", "g1"))
    again = await processor.process(item("alice@contoso.com", "g1", source="delta"))

    assert (first.outcome, again.outcome) == ("tracked", "duplicate_item")
    assert again.activity_id == first.activity_id
    assert sum(1 for c in w.mail.calls if c[0] == "get_message") == 1
    assert w.crm.writes == 1


async def test_duplicate_key_on_write_counts_as_already_tracked() -> None:
    w = World()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    await w.processor().process(item("alice@contoso.com", "g1"))
    w.ledger.entries.clear()  # the ledger lost the entry (or another instance wrote the email first)

    result = await w.processor().process(item("alice@contoso.com", "g1"))

    assert result.outcome == "already_tracked"
    assert len(w.crm.emails) == 1
    assert w.ledger.entries[("alice@contoso.com", "g1")].outcome is LedgerOutcome.ALREADY_TRACKED
    assert "already in CRM" in w.decisions.records[("alice@contoso.com", "g1")]["note"]


async def test_same_message_in_two_tracked_mailboxes_is_one_email_with_both_parties() -> None:
    w = World()
    both = ("alice@contoso.com", "bob@contoso.com")
    w.mail.messages[("alice@contoso.com", "ga")] = graph_message("ga", to=both)
    w.mail.messages[("bob@contoso.com", "gb")] = graph_message("gb", to=both)
    processor = w.processor()

    a = await processor.process(item("alice@contoso.com", "ga"))
    b = await processor.process(item("bob@contoso.com", "gb"))

    assert (a.outcome, b.outcome) == ("tracked", "already_tracked")
    assert a.activity_id == b.activity_id
    (plan,) = w.crm.emails.values()
    assert {p.record for p in plan.parties.recipients()} == {ALICE, BOB}
    assert plan.owner == ALICE  # the first mailbox to track it owns it; the second does not change it


@pytest.mark.parametrize("error", [
    GraphThrottled(429, "ApplicationThrottled", "slow down", retry_after=17.0),
    GraphAccessDenied(401, "InvalidAuthenticationToken", "expired", retry_after=None),
])
async def test_transient_graph_failure_is_re_enqueued_with_a_delay_and_the_invocation_succeeds(
        error: Exception) -> None:
    w = World()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    w.mail.fail["get_message"].append(error)
    processor = w.processor()

    result = await processor.process(item("alice@contoso.com", "g1"))

    assert result.outcome == "retry"
    ((queue, raw, delay),) = w.queue.sent
    assert queue == INBOUND_QUEUE and InboundItem.from_json(raw) == item("alice@contoso.com", "g1")
    if isinstance(error, GraphThrottled):
        assert delay == 17
    assert 5 <= delay <= 900
    assert w.ledger.entries[("alice@contoso.com", "g1")].attempts == 1
    assert not w.crm.emails

    retried = await processor.process(InboundItem.from_json(raw))
    assert retried.outcome == "tracked" and len(w.crm.emails) == 1


@pytest.mark.parametrize("error", [ThrottledError(429, "0x80072322", "", retry_after=3000.0),
                                   TransientError(503, "", "unavailable")])
async def test_transient_dataverse_failure_is_retried_later_with_a_bounded_delay(error: Exception) -> None:
    w = World()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    w.crm.fail_write.append(error)

    result = await w.processor().process(item("alice@contoso.com", "g1"))

    assert result.outcome == "retry"
    assert result.retry_in is not None and 5 <= result.retry_in <= 900  # a 3000 s Retry-After is capped
    assert not w.crm.emails


async def test_transient_failures_become_permanent_after_max_attempts() -> None:
    w = World(options=InboundOptions(max_attempts=2))
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    w.ledger.entries[("alice@contoso.com", "g1")] = LedgerEntry("alice@contoso.com", "g1", LedgerOutcome.RETRYING,
                                                                attempts=2)
    w.crm.fail_write.append(TransientError(503, "", "unavailable"))

    result = await w.processor().process(item("alice@contoso.com", "g1"))

    assert result.outcome == "failed:retries_exhausted"
    assert not w.queue.sent
    assert w.ledger.entries[("alice@contoso.com", "g1")].outcome is LedgerOutcome.FAILED
    assert w.status.failures == [("alice@contoso.com", "retries_exhausted", True)]


async def test_message_gone_is_recorded_not_retried() -> None:
    w = World()
    result = await w.processor().process(item("alice@contoso.com", "missing"))

    assert result.outcome == "gone"
    assert not w.queue.sent and not w.status.failures
    assert w.ledger.entries[("alice@contoso.com", "missing")].outcome is LedgerOutcome.GONE
    assert w.decisions.records[("alice@contoso.com", "missing")]["outcome"].startswith("gone")


async def test_access_denied_is_permanent_and_recorded_on_the_mailbox() -> None:
    w = World()
    w.mail.fail["get_message"].append(GraphAccessDenied(403, "ErrorAccessDenied", "no"))

    result = await w.processor().process(item("alice@contoso.com", "g1"))

    assert result.outcome == "failed:access_denied"
    assert w.status.failures == [("alice@contoso.com", "access_denied", True)]
    assert not w.queue.sent


async def test_crm_rejecting_the_email_is_permanent_and_tags_the_message_undeliverable() -> None:
    w = World()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1", categories=["Blue"])
    w.crm.fail_write.append(BadRequestError(400, "0x80044331", "validation"))

    result = await w.processor().process(item("alice@contoso.com", "g1"))

    assert result.outcome == "failed:crm_rejected"
    assert w.mail.categories[("alice@contoso.com", "g1")] == ["Blue", "Undeliverable"]
    assert w.ledger.entries[("alice@contoso.com", "g1")].outcome is LedgerOutcome.FAILED
    # a redelivery does not try again
    assert (await w.processor().process(item("alice@contoso.com", "g1"))).outcome == "duplicate_item"


async def test_unusable_message_is_permanent() -> None:
    w = World()
    w.mail.messages[("alice@contoso.com", "g1")] = {"subject": "no id"}
    result = await w.processor().process(item("alice@contoso.com", "g1"))
    assert result.outcome == "failed:invalid_message"


@pytest.mark.parametrize(("mailbox", "code"), [
    ("olga@contoso.com", "skipped:mailbox:inbound_outlook"),
    ("nobody@contoso.com", "skipped:mailbox:unknown"),
])
async def test_outlook_and_unknown_mailboxes_get_no_row_but_a_reason(mailbox: str, code: str) -> None:
    w = World()
    w.mail.messages[(mailbox, "g1")] = graph_message("g1", to=(mailbox,))
    result = await w.processor().process(item(mailbox, "g1"))
    assert result.outcome == code
    assert not w.crm.emails and w.crm.writes == 0
    assert w.decisions.records[(mailbox, "g1")]["outcome"] == code
    assert w.ledger.entries[(mailbox, "g1")].outcome is LedgerOutcome.SKIPPED


async def test_none_method_user_is_skipped_with_reason() -> None:
    w = World()
    w.mailboxes.append(user("nina@contoso.com", CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=6)),
                            inbound_method=InboundMethod.NONE))
    w.mail.messages[("nina@contoso.com", "g1")] = graph_message("g1", to=("nina@contoso.com",))
    result = await w.processor().process(item("nina@contoso.com", "g1"))
    assert result.outcome == "skipped:mailbox:inbound_none"
    assert not w.crm.emails


def wrapper(graph_id: str, *, forwarder: str, expanded: bool, auth: str = "Internal") -> dict[str, Any]:
    original = graph_message("", mid="<orig@fabrikam.com>", to=(forwarder,))
    attachment: dict[str, Any] = {"@odata.type": "#microsoft.graph.itemAttachment", "id": "att1",
                                  "name": "Order 1234", "size": 2000}
    if expanded:
        attachment["item"] = {"@odata.type": "#microsoft.graph.message", **original}
    w = graph_message(graph_id, mid=f"<wrap-{graph_id}@contoso.com>", sender=forwarder, to=("crm-sink@contoso.com",),
                      subject="FW: Order 1234", attachments=[attachment],
                      headers=[{"name": "X-MS-Exchange-Organization-AuthAs", "value": auth}])
    return w


def original_mime(*, mid: str = "<orig@fabrikam.com>", to: str = "dave@contoso.com",
                  extra: Mapping[str, str] | None = None) -> bytes:
    """The forwarded original as Exchange gives it from ``.../attachments/{id}/$value``: MIME, every header."""
    lines = ["From: Carol <carol@fabrikam.com>", f"To: {to}", "Subject: Order 1234", f"Message-ID: {mid}",
             "Date: Mon, 02 Mar 2026 11:58:00 +0000",
             *(f"{k}: {v}" for k, v in (extra or {}).items()),
             "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "", "Hello"]
    return "\r\n".join(lines).encode()


async def test_forward_sink_tracks_the_original_for_the_forwarding_user_and_deletes_the_wrapper() -> None:
    w = World()
    w.mail.messages[("crm-sink@contoso.com", "w1")] = wrapper("w1", forwarder="dave@contoso.com", expanded=False)
    w.mail.attachment_mime[("crm-sink@contoso.com", "w1", "att1")] = original_mime()

    result = await w.processor().process(item("crm-sink@contoso.com", "w1"))

    assert result.outcome == "tracked"
    plan = w.crm.emails[activity_id_for("<orig@fabrikam.com>")]
    assert plan.owner == DAVE
    assert w.mail.deleted == [("crm-sink@contoso.com", "w1")]
    assert [c[0] for c in w.mail.calls] == ["get_message", "get_attachment_mime", "delete_message"]


async def test_forwarded_original_is_read_from_its_mime_not_the_expanded_item() -> None:
    """An expanded item has default properties only (no headers); its $value has them: the reply threads by
    In-Reply-To, even when Graph also expanded the item."""
    w = World()
    w.mail.messages[("crm-sink@contoso.com", "w1")] = wrapper("w1", forwarder="dave@contoso.com", expanded=True)
    w.mail.attachment_mime[("crm-sink@contoso.com", "w1", "att1")] = original_mime(
        extra={"In-Reply-To": "<quote-1@contoso.com>", "References": "<quote-1@contoso.com>"})
    quote = KnownEmail(uuid.UUID(int=77), regarding=CrmRecordRef(CrmTable.ACCOUNT, uuid.UUID(int=500)))
    w.crm.by_message_id["<quote-1@contoso.com>"] = quote

    result = await w.processor().process(item("crm-sink@contoso.com", "w1"))

    assert result.outcome == "tracked"
    plan = w.crm.emails[activity_id_for("<orig@fabrikam.com>")]
    assert plan.parent_activity_id == quote.activity_id and plan.regarding == quote.regarding
    assert plan.in_reply_to == "<quote-1@contoso.com>"


@pytest.mark.parametrize(("headers", "outcome"), [
    ({"Auto-Submitted": "auto-replied"}, "skipped:skip_rule:auto_reply"),
    ({"x-emailrouter-activityid": "00000000-0000-0000-0000-000000000009"}, "skipped:skip_rule:own_outbound"),
    ({"Content-Type": 'multipart/report; report-type="delivery-status"; boundary=x'}, "skipped:skip_rule:bounce"),
])
async def test_skip_rules_see_the_forwarded_originals_headers(headers: dict[str, str], outcome: str) -> None:
    w = World()
    w.mail.messages[("crm-sink@contoso.com", "w1")] = wrapper("w1", forwarder="dave@contoso.com", expanded=True)
    w.mail.attachment_mime[("crm-sink@contoso.com", "w1", "att1")] = original_mime(extra=headers)
    result = await w.processor().process(item("crm-sink@contoso.com", "w1"))
    assert result.outcome == outcome
    assert not w.crm.emails


async def test_message_id_already_in_crm_is_not_written_again() -> None:
    """The loop guard (as SSS): the CRM email the router sent has this Message-ID (outbound records it), so its
    Sent Items copy - no internet headers there - is already tracked; looked up with the correlation keys."""
    w = World()
    w.mailboxes[0] = user("alice@contoso.com", ALICE, track_sent_items=True)
    sent = graph_message("s1", mid="<sent-1@contoso.com>", sender="alice@contoso.com", to=("carol@fabrikam.com",),
                         subject="Quote CRM:0001001")
    w.mail.messages[("alice@contoso.com", "s1")] = sent
    crm_email = KnownEmail(uuid.UUID(int=4242))
    w.crm.by_message_id["<sent-1@contoso.com>"] = crm_email

    result = await w.processor().process(item("alice@contoso.com", "s1", folder="sentitems"))

    assert result.outcome == "already_tracked" and result.activity_id == str(crm_email.activity_id)
    assert w.crm.writes == 0 and w.crm.lookups == 1
    assert "<sent-1@contoso.com>" in w.crm.asked[0].message_ids
    entry = w.ledger.entries[("alice@contoso.com", "s1")]
    assert entry.outcome is LedgerOutcome.ALREADY_TRACKED and entry.activity_id == str(crm_email.activity_id)
    assert "already has this Message-ID" in w.decisions.records[("alice@contoso.com", "s1")]["note"]


async def test_sent_items_copy_with_the_marker_property_is_skipped() -> None:
    """Before outbound recorded the Message-ID in CRM, the Sent Items copy is recognised by the MAPI property the
    draft carried (read in the same GET)."""
    from core.domain.model import LOOP_MARKER_PROPERTY

    w = World()
    w.mailboxes[0] = user("alice@contoso.com", ALICE, track_sent_items=True)
    sent = graph_message("s2", mid="<sent-2@contoso.com>", sender="alice@contoso.com", to=("carol@fabrikam.com",))
    sent["singleValueExtendedProperties"] = [{"id": LOOP_MARKER_PROPERTY, "value": str(uuid.UUID(int=5))}]
    w.mail.messages[("alice@contoso.com", "s2")] = sent
    result = await w.processor().process(item("alice@contoso.com", "s2", folder="sentitems"))
    assert result.outcome == "skipped:skip_rule:own_outbound"
    assert w.crm.writes == 0


async def test_spoofed_wrapper_in_the_sink_is_not_tracked_and_kept() -> None:
    w = World()
    w.mail.messages[("crm-sink@contoso.com", "w2")] = wrapper("w2", forwarder="dave@contoso.com", expanded=True,
                                                             auth="Anonymous")
    w.mail.attachment_mime[("crm-sink@contoso.com", "w2", "att1")] = original_mime()
    result = await w.processor().process(item("crm-sink@contoso.com", "w2"))
    assert result.outcome == "skipped:unwrap:external"
    # not deleted (even though the sink deletes processed mail): kept aside in the Undeliverable folder
    assert not w.crm.emails and not w.mail.deleted
    assert w.mail.moved == {("crm-sink@contoso.com", "w2"): "inbox/Undeliverable"}


async def test_decided_wrappers_leave_the_sinks_inbox_tracked_or_not() -> None:
    from core.domain.model import TrackingFilter

    w = World()
    w.mailboxes[-1] = replace(SINK, delete_after_processing=False)  # the default: move, not delete
    w.mailboxes[3] = replace(w.mailboxes[3], tracking_filter=TrackingFilter.NONE)  # dave tracks nothing
    w.mail.messages[("crm-sink@contoso.com", "w3")] = wrapper("w3", forwarder="dave@contoso.com", expanded=True)
    w.mail.attachment_mime[("crm-sink@contoso.com", "w3", "att1")] = original_mime()
    result = await w.processor().process(item("crm-sink@contoso.com", "w3"))
    assert result.outcome == "skipped:filter:not_accepted"
    assert w.mail.moved == {("crm-sink@contoso.com", "w3"): "inbox/Processed"} and not w.mail.deleted
    # with DeleteAfterProcessing a skipped wrapper is deleted like a tracked one
    w.mailboxes[-1] = SINK
    w.mail.messages[("crm-sink@contoso.com", "w4")] = wrapper("w4", forwarder="dave@contoso.com", expanded=True)
    w.mail.attachment_mime[("crm-sink@contoso.com", "w4", "att1")] = original_mime(mid="<orig-4@fabrikam.com>")
    assert (await w.processor().process(item("crm-sink@contoso.com", "w4"))).outcome == "skipped:filter:not_accepted"
    assert ("crm-sink@contoso.com", "w4") in w.mail.deleted
    # "" as the folder name leaves processed wrappers in the Inbox
    w.mailboxes[-1] = replace(SINK, delete_after_processing=False)
    w.router = replace(w.router, processed_folder="")
    w.mail.messages[("crm-sink@contoso.com", "w5")] = wrapper("w5", forwarder="dave@contoso.com", expanded=True)
    w.mail.attachment_mime[("crm-sink@contoso.com", "w5", "att1")] = original_mime(mid="<orig-5@fabrikam.com>")
    await w.processor().process(item("crm-sink@contoso.com", "w5"))
    assert ("crm-sink@contoso.com", "w5") not in w.mail.moved


async def test_attachment_refused_by_crm_is_left_out_with_a_note() -> None:
    w = World()
    big = base64.b64encode(b"x" * 3000).decode()
    small = base64.b64encode(b"y" * 10).decode()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1", attachments=[
        {"@odata.type": "#microsoft.graph.fileAttachment", "id": "a1", "name": "big.bin",
         "contentType": "application/octet-stream", "contentBytes": big, "size": 3000},
        {"@odata.type": "#microsoft.graph.fileAttachment", "id": "a2", "name": "small.txt",
         "contentType": "text/plain", "contentBytes": small, "size": 10}])
    w.crm.max_attachment_bytes = 1000  # the org's real limit is lower than our settings say

    result = await w.processor().process(item("alice@contoso.com", "g1"))

    assert result.outcome == "tracked"
    (plan,) = w.crm.emails.values()
    assert [a.filename for a in plan.attachments] == ["small.txt"]
    assert [o.filename for o in plan.omitted_attachments] == ["big.bin"]
    assert "big.bin" in plan.description and plan.notifications == 1


async def test_mail_without_attachments_costs_one_graph_call() -> None:
    w = World()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    result = await w.processor().process(item("alice@contoso.com", "g1"))
    assert result.outcome == "tracked" and result.graph_calls == 1
    assert [c[0] for c in w.mail.calls] == ["get_message"]


async def test_attachment_content_is_downloaded_only_when_crm_can_keep_it() -> None:
    w = World(org=OrgEmailSettings(internal_domains=frozenset({"contoso.com"}), max_attachment_bytes=4000))
    file = "#microsoft.graph.fileAttachment"
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1", attachments=[
        {"@odata.type": file, "id": "a1", "name": "small.txt", "contentType": "text/plain", "size": 10,
         "isInline": False},
        {"@odata.type": file, "id": "a2", "name": "logo.png", "contentType": "image/png", "size": 20,
         "isInline": True},
        {"@odata.type": file, "id": "a3", "name": "huge.bin", "contentType": "application/octet-stream",
         "size": 9_000_000, "isInline": False},
        {"@odata.type": "#microsoft.graph.referenceAttachment", "id": "a4", "name": "link", "size": 1}])
    w.mail.contents.update({("alice@contoso.com", "g1", "a1"): b"y" * 10, ("alice@contoso.com", "g1", "a2"): b"png"})

    result = await w.processor().process(item("alice@contoso.com", "g1"))

    assert result.outcome == "tracked" and result.graph_calls == 2
    assert w.mail.content_requests == [["a1", "a2"]]  # not the 9 MB file, not the cloud link
    (plan,) = w.crm.emails.values()
    assert [(a.filename, a.content) for a in plan.attachments] == [("small.txt", b"y" * 10), ("logo.png", b"png")]
    omitted = {o.filename: o.reason for o in plan.omitted_attachments}
    assert "attachment limit" in omitted["huge.bin"] and "huge.bin" in plan.description


async def test_a_forwarded_eml_file_is_downloaded_whatever_its_size() -> None:
    w = World(org=OrgEmailSettings(internal_domains=frozenset({"contoso.com"}), max_attachment_bytes=100))
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1", attachments=[
        {"@odata.type": "#microsoft.graph.fileAttachment", "id": "e1", "name": "original.eml",
         "contentType": "message/rfc822", "size": 5000, "isInline": False}])
    w.mail.contents[("alice@contoso.com", "g1", "e1")] = (
        b"From: x@example.org\r\nTo: alice@contoso.com\r\nSubject: inner\r\n\r\n" + b"b" * 4900)
    await w.processor().process(item("alice@contoso.com", "g1"))
    assert w.mail.content_requests == [["e1"]]


async def test_tracked_category_is_added_when_configured() -> None:
    w = World(router=RouterSettings(tracked_category="Tracked to Dynamics 365"))
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1", categories=["Red"])
    await w.processor().process(item("alice@contoso.com", "g1"))
    assert w.mail.categories[("alice@contoso.com", "g1")] == ["Red", "Tracked to Dynamics 365"]


async def test_category_failure_does_not_fail_a_written_email() -> None:
    w = World(router=RouterSettings(tracked_category="Tracked to Dynamics 365"))
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    w.mail.fail["set_categories"].append(GraphAccessDenied(403, "ErrorAccessDenied", "no"))
    result = await w.processor().process(item("alice@contoso.com", "g1"))
    assert result.outcome == "tracked"


async def test_backfill_ignores_the_process_from_date_but_notifications_do_not() -> None:
    w = World()
    w.mailboxes[0] = replace(w.mailboxes[0], process_email_received_after=NOW)  # mail is from 11:59
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    w.mail.messages[("alice@contoso.com", "g2")] = graph_message("g2", mid="<m2@fabrikam.com>")
    processor = w.processor()
    assert (await processor.process(item("alice@contoso.com", "g1"))).outcome == "skipped:skip_rule:too_old"
    assert (await processor.process(item("alice@contoso.com", "g2", source="backfill"))).outcome == "tracked"


def reprocess_item(mailbox: str, graph_id: str, requested_at: datetime, outcomes: str = "skipped,failed"
                   ) -> InboundItem:
    return InboundItem(mailbox, graph_id, "reprocess", folder="inbox", reevaluate=outcomes,
                       requested_at=requested_at.isoformat())


async def test_reprocess_decides_a_skipped_message_again_once_while_redelivery_stays_a_duplicate() -> None:
    from datetime import timedelta

    w = World()
    w.mailboxes[0] = replace(w.mailboxes[0], tracking_filter=TrackingFilter.REPLIES_TO_CRM_EMAIL)
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    processor = w.processor()
    assert (await processor.process(item("alice@contoso.com", "g1"))).outcome == "skipped:filter:not_accepted"

    # The admin sets Alice's filter to "all email". Mail decided before keeps its outcome on redelivery...
    w.mailboxes[0] = replace(w.mailboxes[0], tracking_filter=TrackingFilter.ALL)
    processor = w.processor()
    assert (await processor.process(item("alice@contoso.com", "g1", source="delta"))).outcome == "duplicate_item"
    # ...and `emailrouter reprocess` decides it again, with today's settings: tracked, once.
    asked = NOW + timedelta(minutes=5)
    processor.clock = lambda: asked + timedelta(seconds=1)
    result = await processor.process(reprocess_item("alice@contoso.com", "g1", asked))
    assert result.outcome == "tracked" and list(w.crm.emails) == [activity_id_for("<m1@fabrikam.com>")]
    assert w.decisions.records[("alice@contoso.com", "g1")]["source"] == "reprocess"
    # The same reprocess item delivered twice, or asked for again: the ledger says tracked now.
    assert (await processor.process(reprocess_item("alice@contoso.com", "g1", asked))).outcome == "duplicate_item"
    later = asked + timedelta(hours=1)
    assert (await processor.process(reprocess_item("alice@contoso.com", "g1", later))).outcome == "duplicate_item"
    assert len(w.crm.emails) == 1 and w.crm.writes == 1


async def test_reprocess_overrules_only_the_outcomes_it_names_and_only_once() -> None:
    from datetime import timedelta

    w = World()
    w.mailboxes[0] = replace(w.mailboxes[0], tracking_filter=TrackingFilter.NONE)
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    processor = w.processor()
    assert (await processor.process(item("alice@contoso.com", "g1"))).outcome == "skipped:filter:not_accepted"
    asked = NOW + timedelta(minutes=5)
    only_failed = reprocess_item("alice@contoso.com", "g1", asked, outcomes="failed")
    assert (await processor.process(only_failed)).outcome == "duplicate_item"
    processor.clock = lambda: asked + timedelta(seconds=1)
    again = reprocess_item("alice@contoso.com", "g1", asked)
    assert (await processor.process(again)).outcome == "skipped:filter:not_accepted"  # still "no email messages"
    w.mail.calls.clear()
    assert (await processor.process(again)).outcome == "duplicate_item"  # redelivered: decided once per request
    assert w.mail.calls == []


async def test_unapproved_mailbox_is_skipped() -> None:
    w = World()
    w.mailboxes[0] = replace(w.mailboxes[0], approval=ApprovalStatus.PENDING)
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    assert (await w.processor().process(item("alice@contoso.com", "g1"))).outcome == "skipped:mailbox:not_approved"


async def test_poison_reason_is_recorded_only_on_the_last_attempt() -> None:
    w = World()
    processor = w.processor()
    with pytest.raises(ValueError):
        await processor.handle_message("not json", dequeue_count=1)
    assert not w.poison.rows
    with pytest.raises(ValueError):
        await processor.handle_message("not json", dequeue_count=MAX_DEQUEUE_COUNT)
    (row,) = w.poison.rows
    assert row["queue"] == INBOUND_QUEUE and row["message"] == "not json"
    assert row["reason"].startswith("invalid work item")


async def test_unexpected_error_propagates_for_the_host_retry_and_is_recorded_at_the_end() -> None:
    w = World()
    w.mail.messages[("alice@contoso.com", "g1")] = graph_message("g1")
    w.crm.fail_lookup.append(RuntimeError("bug"))
    with pytest.raises(RuntimeError):
        await w.processor().handle_message(item("alice@contoso.com", "g1").to_json(),
                                           dequeue_count=MAX_DEQUEUE_COUNT)
    assert w.poison.rows[0]["reason"] == "RuntimeError"


def test_max_dequeue_count_matches_host_json() -> None:
    host = json.loads((Path(__file__).parents[3] / "host.json").read_text())
    assert host["extensions"]["queues"]["maxDequeueCount"] == MAX_DEQUEUE_COUNT


@pytest.mark.parametrize(("folder", "kind"), [("inbox", "inbox"), ("SentItems", "sentitems"), ("", "inbox"),
                                              ("junkemail", "junkemail"), ("AAMkFolderId", "other")])
def test_folder_kind_of(folder: str, kind: str) -> None:
    assert folder_kind_of(folder).value == kind

