from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.domain.model import LOOP_MARKER_HEADER, LOOP_MARKER_PROPERTY, ApprovalStatus, Importance, OutboundMethod
from core.domain.outbound import (
    AdminRetry,
    Claimed,
    CrmOutboundEmail,
    InvalidTransition,
    OutboundAttachment,
    OutboundMessage,
    OutboundParty,
    OutboundRejected,
    OutboundState,
    OutboundStatus,
    PendingEmail,
    PermanentFailure,
    ReaperCheck,
    RejectCode,
    SendSucceeded,
    TransientFailure,
    build_outbound_message,
    fair_order,
    next_state,
)
from core.domain.parties import ParticipationType as P

from .factories import ALICE, BOB, CAROL_CONTACT, NOW, org, user_mailbox

SENDER_BOX = user_mailbox(outbound_method=OutboundMethod.ROUTER)
ACTIVITY = uuid.UUID(int=777)


def email(**overrides: Any) -> CrmOutboundEmail:
    values: dict[str, Any] = {
        "activity_id": ACTIVITY,
        "subject": "Your order CRM:0001001",
        "description_html": "<p>Hi</p>",
        "parties": (OutboundParty(P.SENDER, ALICE, "alice@contoso.com", "Alice"),
                    OutboundParty(P.TO, CAROL_CONTACT, "carol@fabrikam.com", "Carol Jones"),
                    OutboundParty(P.CC, BOB, "bob@contoso.com"),
                    OutboundParty(P.BCC, None, "audit@fabrikam.com")),
        "tracking_token": "CRM:0001001",
        "importance": Importance.HIGH,
    }
    values.update(overrides)
    return CrmOutboundEmail(**values)


def build(mail: CrmOutboundEmail | None = None, **org_overrides: Any) -> OutboundMessage | OutboundRejected:
    return build_outbound_message(mail or email(), SENDER_BOX, org(allow_unresolved_parties_on_send=True,
                                                                   **org_overrides))


def test_builds_the_graph_message() -> None:
    built = build()
    assert isinstance(built, OutboundMessage)
    msg = built.graph_message
    assert msg["subject"] == "Your order CRM:0001001"  # token kept
    assert msg["body"] == {"contentType": "HTML", "content": "<p>Hi</p>"}
    assert msg["importance"] == "high"
    assert msg["toRecipients"] == [{"emailAddress": {"address": "carol@fabrikam.com", "name": "Carol Jones"}}]
    assert msg["ccRecipients"] == [{"emailAddress": {"address": "bob@contoso.com"}}]
    assert msg["bccRecipients"] == [{"emailAddress": {"address": "audit@fabrikam.com"}}]
    assert msg["internetMessageHeaders"] == [{"name": LOOP_MARKER_HEADER, "value": str(ACTIVITY)}]
    assert built.sender_address == "alice@contoso.com" and built.loop_marker == str(ACTIVITY)
    # the marker again as a MAPI property: it stays on the Sent Items copy, which has no internet headers
    assert msg["singleValueExtendedProperties"] == [{"id": LOOP_MARKER_PROPERTY, "value": str(ACTIVITY)}]
    assert "attachments" not in msg


@pytest.mark.parametrize(
    ("subject", "token", "limit", "expected"),
    [
        ("Hello CRM:0001001", "CRM:0001001", 255, "Hello CRM:0001001"),
        ("Hello", "CRM:0001001", 255, "Hello CRM:0001001"),  # SendEmail did not append it: we do
        ("x" * 300, "CRM:0001001", 255, "x" * 243 + " CRM:0001001"),  # subject cut so both fit
        ("Hello", "CRM:0001001", 10, "Hello"),  # token alone too long for the limit -> none (crm-ref §6.2)
        ("Hello", None, 255, "Hello"),
    ],
)
def test_subject_keeps_or_adds_the_token(subject: str, token: str | None, limit: int, expected: str) -> None:
    built = build(email(subject=subject, tracking_token=token), max_subject_length_on_mail_server=limit)
    assert isinstance(built, OutboundMessage) and built.graph_message["subject"] == expected


def test_reply_headers_are_set_through_mapi_properties() -> None:
    built = build(email(in_reply_to="<p1@fabrikam.com>", references=("<p0@fabrikam.com>",)))
    assert isinstance(built, OutboundMessage)
    assert built.graph_message["singleValueExtendedProperties"] == [
        {"id": LOOP_MARKER_PROPERTY, "value": str(ACTIVITY)},
        {"id": "String 0x1042", "value": "<p1@fabrikam.com>"},
        {"id": "String 0x1039", "value": "<p0@fabrikam.com> <p1@fabrikam.com>"}]


def test_attachments_split_by_size() -> None:
    small = OutboundAttachment(uuid.UUID(int=1), "a.pdf", "application/pdf", 3, b"pdf")
    inline = OutboundAttachment(uuid.UUID(int=2), "logo.png", "image/png", 3, b"png", "logo@1", True)
    edge = OutboundAttachment(uuid.UUID(int=3), "edge.bin", "application/octet-stream", 100)  # == limit -> upload
    large = OutboundAttachment(uuid.UUID(int=4), "big.zip", "application/zip", 10 * 1024 * 1024)
    built = build_outbound_message(email(attachments=(small, inline, edge, large)), SENDER_BOX,
                                   org(allow_unresolved_parties_on_send=True), inline_limit=100)
    assert isinstance(built, OutboundMessage)
    assert built.graph_message["attachments"] == [
        {"@odata.type": "#microsoft.graph.fileAttachment", "name": "a.pdf", "contentType": "application/pdf",
         "contentBytes": base64.b64encode(b"pdf").decode(), "isInline": False},
        {"@odata.type": "#microsoft.graph.fileAttachment", "name": "logo.png", "contentType": "image/png",
         "contentBytes": base64.b64encode(b"png").decode(), "isInline": True, "contentId": "logo@1"}]
    assert [a.name for a in built.large_attachments] == ["edge.bin", "big.zip"]


@pytest.mark.parametrize(
    ("mail", "org_overrides", "sender_overrides", "code"),
    [
        # header injection: CR/LF/control characters anywhere that becomes a header
        (email(subject="Hi\r\nBcc: victim@x.com"), {}, {}, RejectCode.HEADER_INJECTION),
        (email(subject="Hi\x00"), {}, {}, RejectCode.HEADER_INJECTION),
        (email(subject="Hi\u2028there"), {}, {}, RejectCode.HEADER_INJECTION),
        (email(parties=(OutboundParty(P.SENDER, ALICE, "alice@contoso.com"),
                        OutboundParty(P.TO, CAROL_CONTACT, "carol@fabrikam.com", "Carol\nBcc: x@y.com"))),
         {}, {}, RejectCode.HEADER_INJECTION),
        (email(parties=(OutboundParty(P.SENDER, ALICE, "alice@contoso.com"),
                        OutboundParty(P.TO, CAROL_CONTACT, "carol@fabrikam.com\r\nBcc: x@y.com"))),
         {}, {}, RejectCode.HEADER_INJECTION),
        (email(in_reply_to="<a@b>\r\nX: y"), {}, {}, RejectCode.HEADER_INJECTION),
        (email(attachments=(OutboundAttachment(uuid.UUID(int=1), "a\r\n.pdf", "application/pdf", 1, b"x"),)),
         {}, {}, RejectCode.HEADER_INJECTION),
        # invalid addresses
        (email(parties=(OutboundParty(P.SENDER, ALICE, "alice@contoso.com"),
                        OutboundParty(P.TO, CAROL_CONTACT, "not-an-address"))), {}, {}, RejectCode.INVALID_ADDRESS),
        (email(parties=(OutboundParty(P.SENDER, ALICE, "alice@contoso.com"),
                        OutboundParty(P.TO, CAROL_CONTACT, "a b@x.com"))), {}, {}, RejectCode.INVALID_ADDRESS),
        (email(parties=(OutboundParty(P.SENDER, ALICE, "alice@contoso.com"),
                        OutboundParty(P.TO, CAROL_CONTACT, None))), {}, {}, RejectCode.INVALID_ADDRESS),
        # unresolved recipients follow allowunresolvedpartiesonemailsend
        (email(), {"allow_unresolved_parties_on_send": False}, {}, RejectCode.UNRESOLVED_RECIPIENT),
        (email(parties=(OutboundParty(P.SENDER, ALICE, "alice@contoso.com"),)), {}, {}, RejectCode.NO_RECIPIENTS),
        # only the email's own sender mailbox, and only a router-outbound one
        (email(), {}, {"owner": BOB}, RejectCode.SENDER_MISMATCH),
        (email(parties=email().parties[1:]), {}, {}, RejectCode.SENDER_MISMATCH),
        (email(), {}, {"outbound_method": OutboundMethod.OUTLOOK}, RejectCode.SENDER_NOT_ROUTER),
        (email(), {}, {"enabled_for_outgoing": False}, RejectCode.SENDER_NOT_ROUTER),
        (email(), {}, {"approval": ApprovalStatus.REJECTED}, RejectCode.SENDER_NOT_ROUTER),
        # attachments
        (email(attachments=(OutboundAttachment(uuid.UUID(int=1), "huge", "x/y", 151 * 1024 * 1024),)), {}, {},
         RejectCode.ATTACHMENT_TOO_LARGE),
        (email(attachments=(OutboundAttachment(uuid.UUID(int=1), "small", "x/y", 10),)), {}, {},
         RejectCode.ATTACHMENT_MISSING),
    ],
)
def test_rejections(mail: CrmOutboundEmail, org_overrides: dict[str, Any], sender_overrides: dict[str, Any],
                    code: RejectCode) -> None:
    settings = {"allow_unresolved_parties_on_send": True, **org_overrides}
    result = build_outbound_message(mail, replace(SENDER_BOX, **sender_overrides), org(**settings))
    assert isinstance(result, OutboundRejected)
    assert result.code is code and result.why


def test_too_many_recipients() -> None:
    to = tuple(OutboundParty(P.TO, CAROL_CONTACT, f"u{i}@x.com") for i in range(501))
    result = build(email(parties=(OutboundParty(P.SENDER, ALICE, "alice@contoso.com"), *to)))
    assert isinstance(result, OutboundRejected) and result.code is RejectCode.TOO_MANY_RECIPIENTS


# ---- fairness -------------------------------------------------------------------------------------------------


def pending(sender: str, n: int, minute: int) -> PendingEmail:
    return PendingEmail(uuid.uuid5(uuid.NAMESPACE_OID, f"{sender}-{n}"), sender, NOW + timedelta(minutes=minute))


def test_heavy_sender_does_not_starve_a_light_one() -> None:
    heavy = [pending("heavy", i, i) for i in range(1000)]
    light = [pending("light", 0, 500)]
    ordered = fair_order(heavy + light, per_sender_cap=50)
    assert [p.sender for p in ordered[:4]] == ["heavy", "light", "heavy", "heavy"]
    assert len(ordered) == 51


_pending_lists = st.lists(
    st.builds(lambda s, n, m: pending(s, n, m), st.sampled_from("abcdef"), st.integers(0, 10_000),
              st.integers(0, 10_000)),
    max_size=80, unique_by=lambda p: p.activity_id)


@given(_pending_lists, st.integers(1, 10))
def test_fair_order_properties(items: list[PendingEmail], cap: int) -> None:
    ordered = fair_order(items, per_sender_cap=cap)
    senders = {p.sender for p in items}
    # a subset, no duplicates, each sender capped and keeping its own oldest-first order
    assert len({p.activity_id for p in ordered}) == len(ordered)
    assert {p.activity_id for p in ordered} <= {p.activity_id for p in items}
    for sender in senders:
        mine = [p for p in ordered if p.sender == sender]
        all_mine = sorted((p for p in items if p.sender == sender), key=lambda p: (p.modified_on,
                                                                                    str(p.activity_id)))
        assert mine == all_mine[: min(cap, len(all_mine))]
    # every sender with pending mail gets its first email within the first round
    assert {p.sender for p in ordered[: len(senders)]} == senders
    # round-robin: in any prefix, two senders' counts differ by at most one while both still have mail queued
    counts: dict[object, int] = {}
    for p in ordered:
        counts[p.sender] = counts.get(p.sender, 0) + 1
        available = {s: min(cap, sum(1 for q in items if q.sender == s)) for s in senders}
        active = [c for s, c in counts.items() if c < available[s]]
        if active:
            assert max(active) - min(active) <= 1


def test_fair_order_rejects_a_zero_cap() -> None:
    with pytest.raises(ValueError, match="per_sender_cap"):
        fair_order([], per_sender_cap=0)


# ---- state machine --------------------------------------------------------------------------------------------

PENDING = OutboundState(OutboundStatus.PENDING_SEND, 0)
SENDING = OutboundState(OutboundStatus.SENDING, 2, claimed_at=NOW)
FAILED = OutboundState(OutboundStatus.FAILED, 5, reason="boom")
LATER = NOW + timedelta(minutes=30)


@pytest.mark.parametrize(
    ("current", "event", "expected"),
    [
        (PENDING, Claimed(NOW), OutboundState(OutboundStatus.SENDING, 0, NOW)),
        (SENDING, SendSucceeded(), OutboundState(OutboundStatus.SENT, 3)),
        (SENDING, TransientFailure("429", max_attempts=5), OutboundState(OutboundStatus.PENDING_SEND, 3, None, "429")),
        (replace(SENDING, delivery_attempts=4), TransientFailure("503", max_attempts=5),
         OutboundState(OutboundStatus.FAILED, 5, None, "gave up after 5 attempts: 503")),
        (SENDING, PermanentFailure("403 mailbox not allowed"),
         OutboundState(OutboundStatus.FAILED, 3, None, "403 mailbox not allowed")),
        (SENDING, ReaperCheck(LATER, timedelta(minutes=10), 5),
         OutboundState(OutboundStatus.PENDING_SEND, 3, None, "stuck in Sending past the timeout")),
        (SENDING, ReaperCheck(NOW + timedelta(minutes=5), timedelta(minutes=10), 5), SENDING),
        (PENDING, ReaperCheck(LATER, timedelta(minutes=10), 5), PENDING),
        (FAILED, AdminRetry(), OutboundState(OutboundStatus.PENDING_SEND, 0)),
    ],
)
def test_outbound_state_machine(current: OutboundState, event: Any, expected: OutboundState) -> None:
    assert next_state(current, event) == expected


@pytest.mark.parametrize(
    ("current", "event"),
    [
        (SENDING, Claimed(NOW)),  # a second worker cannot claim
        (PENDING, SendSucceeded()),
        (OutboundState(OutboundStatus.SENT, 1), Claimed(NOW)),  # sent stays sent: no double send
        (OutboundState(OutboundStatus.SENT, 1), TransientFailure("x", 5)),
        (FAILED, Claimed(NOW)),
        (PENDING, AdminRetry()),
    ],
)
def test_invalid_transitions_raise(current: OutboundState, event: Any) -> None:
    with pytest.raises(InvalidTransition):
        next_state(current, event)


@pytest.mark.parametrize(("status", "pair"), [(OutboundStatus.PENDING_SEND, (1, 6)), (OutboundStatus.SENDING, (1, 7)),
                                              (OutboundStatus.SENT, (1, 3)), (OutboundStatus.FAILED, (0, 8))])
def test_crm_state_status_pairs(status: OutboundStatus, pair: tuple[int, int]) -> None:
    assert status.crm == pair
