from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from core.domain.model import LOOP_MARKER_HEADER, Folder, FolderKind, MailboxKind
from core.domain.skip import SKIP_RULES, SkipCode, first_skip_reason

from .factories import NOW, SUPPORT_Q, addr, message, org, ref, user_mailbox

INTERNAL = {"from_": addr("bob@contoso.com"), "to": (addr("alice@contoso.com"),)}


@pytest.mark.parametrize(
    ("message_overrides", "mailbox_overrides", "org_overrides", "expected"),
    [
        # nothing to skip
        ({}, {}, {}, None),
        # drafts
        ({"is_draft": True}, {}, {}, SkipCode.DRAFT),
        ({"folder": Folder(FolderKind.DRAFTS, "d")}, {}, {}, SkipCode.DRAFT),
        # junk
        ({"folder": Folder(FolderKind.JUNK, "j")}, {}, {}, SkipCode.JUNK),
        # folders: only Inbox, mapped folders, Sent Items when enabled (crm-ref §5.3)
        ({"folder": Folder(FolderKind.OTHER, "sub")}, {}, {}, SkipCode.FOLDER_NOT_TRACKED),
        ({"folder": Folder(FolderKind.OTHER, "sub")}, {"folder_regarding": {"sub": ref("account", 5)}}, {}, None),
        ({"folder": Folder(FolderKind.SENT_ITEMS, "s")}, {}, {}, SkipCode.FOLDER_NOT_TRACKED),
        ({"folder": Folder(FolderKind.SENT_ITEMS, "s")}, {"track_sent_items": True}, {}, None),
        # our own outbound loop marker
        ({"headers": [(LOOP_MARKER_HEADER.upper(), "1234")]}, {}, {}, SkipCode.OWN_OUTBOUND),
        # no Message-ID
        ({"internet_message_id": None}, {}, {}, SkipCode.NO_MESSAGE_ID),
        ({"internet_message_id": "<>"}, {}, {}, SkipCode.NO_MESSAGE_ID),
        # bounces / reports
        ({"headers": [("Content-Type", "multipart/report; report-type=delivery-status; boundary=x")]}, {}, {},
         SkipCode.BOUNCE),
        ({"headers": [("Content-Type", "multipart/report; report-type=disposition-notification")]}, {}, {},
         SkipCode.BOUNCE),
        ({"headers": [("X-MS-Exchange-Message-Is-Ndr", "")]}, {}, {}, SkipCode.BOUNCE),
        # A sender's name alone is no evidence: a mail admin writing from postmaster@ is tracked like anyone.
        ({"from_": addr("MAILER-DAEMON@fabrikam.com")}, {}, {}, None),
        ({"from_": addr("postmaster@fabrikam.com")}, {}, {}, None),
        ({"from_": addr("MAILER-DAEMON@fabrikam.com"), "headers": [("Return-Path", "<>")]}, {}, {}, SkipCode.BOUNCE),
        ({"from_": addr("postmaster@fabrikam.com"), "headers": [("Return-Path", "<postmaster@fabrikam.com>")]},
         {}, {}, None),
        ({"headers": [("X-Failed-Recipients", "gone@fabrikam.com")]}, {}, {}, SkipCode.BOUNCE),
        # auto replies (RFC 3834, EspoCRM headers)
        ({"headers": [("Auto-Submitted", "auto-replied")]}, {}, {}, SkipCode.AUTO_REPLY),
        ({"headers": [("Auto-Submitted", "auto-generated; x=y")]}, {}, {}, SkipCode.AUTO_REPLY),
        ({"headers": [("Auto-Submitted", "no")]}, {}, {}, None),
        ({"headers": [("X-Autoreply", "yes")]}, {}, {}, SkipCode.AUTO_REPLY),
        ({"headers": [("X-Autorespond", "x")]}, {}, {}, SkipCode.AUTO_REPLY),
        ({"headers": [("Precedence", "auto_reply")]}, {}, {}, SkipCode.AUTO_REPLY),
        ({"headers": [("Precedence", "bulk")]}, {}, {}, None),
        ({"headers": [("Precedence", "bulk")]}, {}, {"treat_precedence_bulk_as_auto_reply": True},
         SkipCode.AUTO_REPLY),
        ({"headers": [("X-Auto-Response-Suppress", "All")]}, {}, {}, None),
        ({"headers": [("X-Auto-Response-Suppress", "All")]}, {}, {"treat_auto_response_suppress_as_auto_reply": True},
         SkipCode.AUTO_REPLY),
        # never-log list: any participant, address or domain
        ({}, {}, {"never_log_addresses": frozenset({"Carol@Fabrikam.com"})}, SkipCode.NEVER_LOG),
        ({"cc": (addr("hr@legal.example"),)}, {}, {"never_log_domains": frozenset({"legal.example"})},
         SkipCode.NEVER_LOG),
        # process-from date / high-water mark
        ({}, {"process_email_received_after": NOW + timedelta(seconds=1)}, {}, SkipCode.TOO_OLD),
        ({}, {"process_email_received_after": NOW}, {}, None),
        # internal mail
        (INTERNAL, {}, {}, None),
        (INTERNAL, {}, {"ignore_internal_email": True}, SkipCode.INTERNAL),
        ({**INTERNAL, "cc": (addr("carol@fabrikam.com"),)}, {}, {"ignore_internal_email": True}, None),
        (INTERNAL, {"kind": MailboxKind.QUEUE, "owner": SUPPORT_Q}, {"ignore_internal_email": True}, None),
        (INTERNAL, {"kind": MailboxKind.QUEUE, "owner": SUPPORT_Q},
         {"ignore_internal_email": True, "do_not_ignore_internal_email_to_queues": False}, SkipCode.INTERNAL),
    ],
)
def test_skip_rules(message_overrides: dict[str, Any], mailbox_overrides: dict[str, Any],
                    org_overrides: dict[str, Any], expected: SkipCode | None) -> None:
    reason = first_skip_reason(message(**message_overrides), user_mailbox(**mailbox_overrides), org(**org_overrides))
    assert (reason.code if reason else None) == expected
    if reason is not None:
        assert reason.why


def test_internal_mail_to_a_queue_recipient_is_kept() -> None:
    m = message(**{**INTERNAL, "to": (addr("support@contoso.com"),)})
    reason = first_skip_reason(m, user_mailbox(), org(ignore_internal_email=True),
                               queue_addresses=["support@contoso.com"])
    assert reason is None


def test_first_match_wins_in_the_documented_order() -> None:
    m = message(is_draft=True, headers=[("Auto-Submitted", "auto-replied"), (LOOP_MARKER_HEADER, "x")])
    reason = first_skip_reason(m, user_mailbox(), org())
    assert reason is not None and reason.code is SkipCode.DRAFT
    assert [code for code, _ in SKIP_RULES][:4] == [SkipCode.DRAFT, SkipCode.JUNK, SkipCode.FOLDER_NOT_TRACKED,
                                                    SkipCode.OWN_OUTBOUND]
