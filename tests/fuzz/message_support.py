"""Checks shared by the message fuzzing: bounds of a normalised message and the pure inbound path after it."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from core.domain.forward import NotUnwrapped, Unwrapped, unwrap_forwarded
from core.domain.inbound import EMAIL_SUBJECT_MAX, MESSAGEID_MAX, InboundContext, Skip, TrackEmail, plan_inbound
from core.domain.model import (
    CrmRecordRef,
    CrmTable,
    FolderKind,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    MailMessage,
    OrgEmailSettings,
    TrackingFilter,
    WrapperTrustPolicy,
)
from core.domain.normalize import LIMITS, InvalidMessage
from tests.security.html_checks import dangerous_parts

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is kept by design

ALICE = CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=1))
DAVE = CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=4))
USER = MailboxConfig(address="alice@contoso.example", kind=MailboxKind.USER, owner=ALICE,
                     mailbox_id=uuid.UUID(int=9001), inbound_method=InboundMethod.INDIVIDUAL,
                     tracking_filter=TrackingFilter.ALL)
SINK = MailboxConfig(address="crm-sink@contoso.example", kind=MailboxKind.FORWARD_SINK, delete_after_processing=True)
FORWARDER = MailboxConfig(address="dave@contoso.example", kind=MailboxKind.USER, owner=DAVE,
                          mailbox_id=uuid.UUID(int=9004), inbound_method=InboundMethod.FORWARD,
                          tracking_filter=TrackingFilter.ALL, forward_sink_address=SINK.address)
FORWARD_USERS = {FORWARDER.address: FORWARDER}
ORG = OrgEmailSettings(internal_domains=frozenset({"contoso.example"}))


def normalised_or_reason(make: Callable[[], MailMessage]) -> MailMessage | None:
    """Run a normaliser: a message, or None after an InvalidMessage with a clear reason. Anything else propagates
    (and fails the test)."""
    try:
        return make()
    except InvalidMessage as exc:
        assert isinstance(exc.reason, str) and exc.reason.strip(), "InvalidMessage without a reason"
        return None


def assert_bounded(message: MailMessage, depth: int = 0) -> None:
    """Every cap of NormalizeLimits holds, at every nesting level."""
    assert depth <= LIMITS.max_nesting_depth, f"nested deeper than {LIMITS.max_nesting_depth}"
    for field_name in ("to", "cc", "bcc", "reply_to"):
        addresses = getattr(message, field_name)
        assert len(addresses) <= LIMITS.max_recipients_per_field, field_name
    for address in (*message.recipients(), *message.reply_to, message.from_, message.sender):
        if address is None:
            continue
        assert 0 < len(address.address) <= LIMITS.max_address_chars and "@" in address.address
        assert address.address == address.address.lower()
        assert not _CONTROL.search(address.address) and not _CONTROL.search(address.name)
        assert len(address.name) <= LIMITS.max_name_chars
    assert len(message.subject) <= LIMITS.max_subject_chars
    assert not _CONTROL.search(message.subject), "control characters survived in the subject"
    assert len(message.headers) <= LIMITS.max_headers
    for name, value in message.headers:
        assert len(name) <= LIMITS.max_header_name_chars and len(value) <= LIMITS.max_header_value_chars
    assert len(message.attachments) <= LIMITS.max_attachments
    assert len(message.references) <= LIMITS.max_references
    assert len(message.categories) <= LIMITS.max_categories
    for body in (message.body_html, message.body_text):
        assert body is None or len(body) <= LIMITS.max_body_chars
    assert len(message.truncations) <= 100
    if message.internet_message_id is not None:
        assert len(message.internet_message_id) <= LIMITS.max_header_value_chars
    for attachment in message.attachments:
        assert len(attachment.name) <= 255 and not _CONTROL.search(attachment.name)
        if attachment.item is not None:
            assert_bounded(attachment.item, depth + 1)


def assert_pure_path(message: MailMessage) -> None:
    """The decisions after normalisation: planning as a user's mailbox and as a forward sink never raises and
    always explains itself; a tracked email fits the CRM columns and carries sanitised HTML."""
    for folder in (FolderKind.INBOX, FolderKind.SENT_ITEMS):
        as_user = replace(message, mailbox=USER.address, folder=replace(message.folder, kind=folder))
        _check_plan(plan_inbound(as_user, InboundContext(mailbox=USER, org=ORG, now=NOW)))
    wrapper = replace(message, mailbox=SINK.address, folder=replace(message.folder, kind=FolderKind.INBOX))
    for trust in (WrapperTrustPolicy(), WrapperTrustPolicy(require_internal_auth=False)):
        result = unwrap_forwarded(wrapper, SINK, FORWARD_USERS, trust=trust)
        assert isinstance(result, Unwrapped | NotUnwrapped)
        if isinstance(result, NotUnwrapped):
            assert result.why.strip()
        else:
            assert result.tracking_mailbox is FORWARDER
            assert wrapper.from_ is not None and wrapper.from_.address == FORWARDER.address
        org = replace(ORG, wrapper_trust=trust)
        _check_plan(plan_inbound(wrapper, InboundContext(mailbox=SINK, org=org, now=NOW,
                                                         forward_users=FORWARD_USERS)))


def _check_plan(plan: Skip | TrackEmail) -> None:
    assert isinstance(plan, Skip | TrackEmail)
    assert plan.decisions, "a plan without a decision trail"
    if isinstance(plan, Skip):
        assert plan.code and plan.why.strip()
        return
    assert len(plan.subject) <= EMAIL_SUBJECT_MAX and len(plan.message_id) <= MESSAGEID_MAX
    problems = dangerous_parts(plan.description)
    assert problems == [], f"unsafe HTML survived sanitising: {problems[:5]}"
