from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from typing import Any

import pytest

from core.domain.correlation import CorrelationLookup, CorrelationMethod, KnownEmail
from core.domain.identity import activity_id_for, contact_id_for
from core.domain.inbound import (
    InboundContext,
    Skip,
    TrackEmail,
    decision_record,
    explain,
    inbound_lookups,
    plan_attachment_rows,
    plan_contact_row,
    plan_email_row,
    plan_inbound,
    plan_state_patch,
)
from core.domain.model import (
    ApprovalStatus,
    Attachment,
    Folder,
    FolderKind,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    TrackingFilter,
    WrapperTrustPolicy,
)

from .factories import ALICE, BOB, CAROL_CONTACT, CASE, NOW, addr, directory, message, org, user_mailbox


def context(**overrides: Any) -> InboundContext:
    values: dict[str, Any] = {"mailbox": user_mailbox(), "org": org(), "now": NOW, "directory": directory()}
    values.update(overrides)
    return InboundContext(**values)


def test_tracks_a_received_email_with_everything_planned() -> None:
    reply_to = KnownEmail(uuid.UUID(int=42), regarding=CASE, owner=ALICE)
    ctx = context(correlation=CorrelationLookup({"<p1@contoso.com>": reply_to}, {}, {}))
    m = message(in_reply_to="<p1@contoso.com>", subject="RE: Order CRM:0001234", cc=(addr("x@unknown.example"),),
                conversation_index=bytes(27))
    plan = plan_inbound(m, ctx)
    assert isinstance(plan, TrackEmail)
    assert plan.activity_id == activity_id_for("<m1@fabrikam.com>")
    assert (plan.state_code, plan.status_code) == (1, 4)
    assert plan.direction.directioncode is False
    assert plan.regarding == CASE and plan.parent_activity_id == reply_to.activity_id
    assert plan.correlation_method is CorrelationMethod.IN_REPLY_TO
    assert plan.tracking_token == "CRM:0001234"
    assert plan.owner == ALICE and plan.accepting_entity == ALICE
    assert plan.actual_end == NOW
    assert [d.step for d in plan.decisions][:3] == ["mailbox", "skip_rule", "direction"]

    row = plan_email_row(plan)
    assert row["activityid"] == str(plan.activity_id)
    assert row["directioncode"] is False
    assert row["messageid"] == "<m1@fabrikam.com>"
    assert row["trackingtoken"] == "CRM:0001234"
    assert row["regardingobjectid_incident_email@odata.bind"] == f"/incidents({CASE.id})"
    # the names email.md declares (the documented schema; the gateway passes the org's own)
    assert row["ownerid_email@odata.bind"] == f"/systemusers({ALICE.id})"
    assert row["parentactivityid@odata.bind"] == f"/emails({reply_to.activity_id})"
    assert row["CorrelatedActivityId_Email@odata.bind"] == f"/emails({reply_to.activity_id})"
    assert row["ReceivingMailboxId_Email@odata.bind"] == f"/mailboxes({uuid.UUID(int=9001)})"
    # acceptingentityid is ONE name for queue and systemuser: ambiguous, so never bound (audit 1a #2)
    assert not any(k.startswith("acceptingentityid") for k in row)
    assert row["email_activity_parties"] == [
        {"participationtypemask": 1, "addressused": "carol@fabrikam.com",
         "partyid_contact@odata.bind": f"/contacts({CAROL_CONTACT.id})"},
        {"participationtypemask": 2, "addressused": "alice@contoso.com",
         "partyid_systemuser@odata.bind": f"/systemusers({ALICE.id})"},
        {"participationtypemask": 3, "addressused": "x@unknown.example"},
    ]
    assert "conversationindex" not in row and "inreplyto" not in row and "correlationmethod" not in row
    full = plan_email_row(plan, include_read_only_columns=True)
    assert full["inreplyto"] == "<p1@contoso.com>" and full["conversationindex"] == base64.b64encode(
        bytes(27)).decode()
    assert plan_state_patch(plan) == {"statecode": 1, "statuscode": 4}


def test_same_message_in_two_mailboxes_is_one_activity() -> None:
    m = message(to=(addr("alice@contoso.com"), addr("bob@contoso.com")))
    bob_box = user_mailbox(address="bob@contoso.com", owner=BOB, mailbox_id=uuid.UUID(int=9002))
    a = plan_inbound(m, context())
    b = plan_inbound(replace(m, mailbox="bob@contoso.com"), context(mailbox=bob_box))
    assert isinstance(a, TrackEmail) and isinstance(b, TrackEmail)
    assert a.activity_id == b.activity_id
    assert {a.owner, b.owner} == {ALICE, BOB}


def test_outgoing_from_sent_items_is_sent_and_outgoing() -> None:
    m = message(folder=Folder(FolderKind.SENT_ITEMS, "s"), from_=addr("alice@contoso.com"),
                to=(addr("carol@fabrikam.com"),))
    plan = plan_inbound(m, context(mailbox=user_mailbox(track_sent_items=True)))
    assert isinstance(plan, TrackEmail)
    assert plan.direction.directioncode is True and (plan.state_code, plan.status_code) == (1, 3)
    assert plan_email_row(plan)["directioncode"] is True


@pytest.mark.parametrize(
    ("mailbox_overrides", "org_overrides", "code"),
    [
        ({"inbound_method": InboundMethod.NONE}, {}, "inbound_none"),
        ({"inbound_method": InboundMethod.OUTLOOK}, {}, "inbound_outlook"),
        ({"inbound_method": InboundMethod.FORWARD}, {}, "inbound_forward"),
        ({"enabled_for_incoming": False}, {}, "disabled"),
        ({"approval": ApprovalStatus.PENDING}, {}, "not_approved"),
        ({"tracking_filter": TrackingFilter.NONE}, {}, "not_accepted"),
    ],
)
def test_mailbox_gates_and_filter_skip_with_a_reason(mailbox_overrides: dict[str, Any],
                                                     org_overrides: dict[str, Any], code: str) -> None:
    plan = plan_inbound(message(), context(mailbox=user_mailbox(**mailbox_overrides), org=org(**org_overrides)))
    assert isinstance(plan, Skip) and plan.code == code
    assert plan.decisions[-1].outcome == f"skip:{code}"
    assert "NOT TRACKED" in explain(plan)


def test_unapproved_mailbox_is_processed_when_approval_not_required() -> None:
    plan = plan_inbound(message(), context(mailbox=user_mailbox(approval=ApprovalStatus.PENDING),
                                           org=org(require_approval_for_user_email=False)))
    assert isinstance(plan, TrackEmail)


def test_skip_rule_reason_is_carried() -> None:
    plan = plan_inbound(message(headers=[("Auto-Submitted", "auto-replied")]), context())
    assert isinstance(plan, Skip) and (plan.stage, plan.code) == ("skip_rule", "auto_reply")


def test_attachments_within_the_limit_and_oversize_noted() -> None:
    small = Attachment("a.pdf", "application/pdf", 3, content=b"pdf")
    inline = Attachment("logo.png", "image/png", 3, is_inline=True, content_id="logo@1", content=b"png")
    big = Attachment("big.zip", "application/zip", 4000, content=b"x" * 4000)
    plan = plan_inbound(message(attachments=(small, inline, big)), context(org=org(max_attachment_bytes=4096)))
    assert isinstance(plan, TrackEmail)
    assert [a.filename for a in plan.attachments] == ["a.pdf", "logo.png"]
    assert [o.filename for o in plan.omitted_attachments] == ["big.zip"]  # 4000 bytes = 5336 base64 > 4096
    assert "big.zip" in plan.description and plan.notifications == 1
    rows = plan_attachment_rows(plan)
    assert rows[0]["objectid_email@odata.bind"] == f"/emails({plan.activity_id})"
    assert rows[0]["body"] == base64.b64encode(b"pdf").decode() and rows[0]["objecttypecode"] == "email"
    assert rows[1]["attachmentcontentid"] == "logo@1"
    assert rows == plan_attachment_rows(plan)  # deterministic ids: a retry writes the same rows


def test_what_normalisation_dropped_is_on_the_crm_email_and_counted() -> None:
    capped = message(truncations=("attachments: capped at 250 (78 more not saved)",
                                  "internetMessageHeaders: capped at 300"))
    plan = plan_inbound(capped, context())
    assert isinstance(plan, TrackEmail) and plan.notifications == 1  # not all attachments could be saved
    assert "78 more not saved" in plan.description and "Email Router: not everything" in plan.description
    assert "internetMessageHeaders" not in plan.description  # headers are not on the CRM email: record only
    assert plan.dropped == ("attachments: capped at 250 (78 more not saved)",)
    record = decision_record(capped, plan)
    assert record["incomplete"] == {"omittedAttachments": 0, "dropped": 1, "notifications": 1}
    assert record["truncations"] == 2
    body = plan_inbound(message(truncations=("body: bytes not valid in its charset 'utf-8' replaced",)), context())
    assert isinstance(body, TrackEmail) and body.notifications == 2  # truncated body
    assert plan_email_row(body)["notifications"] == 2
    clean = plan_inbound(message(), context())
    assert isinstance(clean, TrackEmail) and clean.notifications == 0 and "Email Router" not in clean.description


def test_description_is_sanitised() -> None:
    plan = plan_inbound(message(body_html='<p onclick="x()">Hi<script>alert(1)</script></p>'), context())
    assert isinstance(plan, TrackEmail) and plan.description == "<p>Hi</p>"
    plan = plan_inbound(message(body_html=None, body_text="a<b"), context())
    assert isinstance(plan, TrackEmail) and plan.description == "<div>a&lt;b</div>"


@pytest.mark.parametrize(
    ("sender", "auto_create", "expected"),
    [
        ("new.person@fabrikam.com", True, True),
        ("new.person@fabrikam.com", False, False),
        ("carol@fabrikam.com", True, False),  # known sender
        ("colleague@contoso.com", True, False),  # internal domain
    ],
)
def test_auto_create_contact_for_unknown_sender(sender: str, auto_create: bool, expected: bool) -> None:
    m = message(from_=addr(sender, "Jones, Pat"))
    plan = plan_inbound(m, context(mailbox=user_mailbox(auto_create_contacts=auto_create)))
    assert isinstance(plan, TrackEmail)
    assert (plan.new_contact is not None) is expected
    if expected:
        row = plan_contact_row(plan)
        assert row == {"contactid": str(contact_id_for(sender)), "emailaddress1": sender, "lastname": "Jones",
                       "firstname": "Pat", "ownerid@odata.bind": f"/systemusers({ALICE.id})"}
        assert plan_email_row(plan)["email_activity_parties"][0]["partyid_contact@odata.bind"] == (
            f"/contacts({contact_id_for(sender)})")
    else:
        assert plan_contact_row(plan) is None


# ---- forward sinks --------------------------------------------------------------------------------------------

SINK = MailboxConfig(address="crm-sink@contoso.com", kind=MailboxKind.FORWARD_SINK, delete_after_processing=True,
                     mailbox_id=uuid.UUID(int=9099))
DAVE_REF = ALICE  # reuse a systemuser id for the forwarding user
DAVE = user_mailbox(address="dave@contoso.com", inbound_method=InboundMethod.FORWARD, owner=DAVE_REF,
                    forward_sink_address="crm-sink@contoso.com", mailbox_id=uuid.UUID(int=9003))


def _wrapper(**overrides: Any) -> Any:
    original = message(mailbox="crm-sink@contoso.com", graph_id="", folder=Folder(FolderKind.OTHER),
                       internet_message_id="<orig@fabrikam.com>", to=(addr("dave@contoso.com"),))
    values: dict[str, Any] = {
        "mailbox": "crm-sink@contoso.com", "graph_id": "wrap-1", "internet_message_id": "<wrap@contoso.com>",
        "from_": addr("dave@contoso.com"), "to": (addr("crm-sink@contoso.com"),),
        "headers": [("X-MS-Exchange-Organization-AuthAs", "Internal")],
        "attachments": (Attachment("Order", "message/rfc822", 100, item=original),),
    }
    values.update(overrides)
    return message(**values)


def test_forwarded_mail_is_tracked_for_the_forwarding_user_and_wrapper_deleted() -> None:
    ctx = context(mailbox=SINK, forward_users={"dave@contoso.com": DAVE})
    lookups = inbound_lookups(_wrapper(), ctx)
    assert lookups.message is not None and lookups.message.internet_message_id == "<orig@fabrikam.com>"
    assert lookups.addresses == {"carol@fabrikam.com", "dave@contoso.com"}
    plan = plan_inbound(_wrapper(), ctx)
    assert isinstance(plan, TrackEmail)
    assert plan.activity_id == activity_id_for("<orig@fabrikam.com>")
    assert plan.owner == DAVE_REF and plan.mailbox_address == "dave@contoso.com"
    assert plan.receiving_mailbox_id == uuid.UUID(int=9003)
    assert plan.wrapper_graph_id == "wrap-1" and plan.delete_wrapper


def test_spoofed_wrapper_in_the_sink_is_not_tracked() -> None:
    ctx = context(mailbox=SINK, forward_users={"dave@contoso.com": DAVE})
    plan = plan_inbound(_wrapper(headers=[("X-MS-Exchange-Organization-AuthAs", "Anonymous")]), ctx)
    assert isinstance(plan, Skip) and (plan.stage, plan.code) == ("unwrap", "external")
    assert plan.wrapper_graph_id == "wrap-1"
    assert inbound_lookups(_wrapper(headers=[]), ctx).message is None
    lenient = context(mailbox=SINK, forward_users={"dave@contoso.com": DAVE},
                      org=org(wrapper_trust=WrapperTrustPolicy(require_internal_auth=False)))
    assert isinstance(plan_inbound(_wrapper(headers=[]), lenient), TrackEmail)


def test_decision_record_is_json_shaped() -> None:
    m = message()
    plan = plan_inbound(m, context())
    record = decision_record(m, plan)
    assert record["outcome"] == "tracked" and record["activityId"] == str(activity_id_for("<m1@fabrikam.com>"))
    assert all(set(d) == {"step", "outcome", "why"} for d in record["decisions"])


def test_decision_record_of_a_forward_describes_the_original_for_the_forwarding_user() -> None:
    ctx = context(mailbox=SINK, forward_users={"dave@contoso.com": DAVE})
    wrapper = _wrapper()
    record = decision_record(wrapper, plan_inbound(wrapper, ctx))
    assert record["mailbox"] == "crm-sink@contoso.com" and record["trackedFor"] == "dave@contoso.com"
    assert record["internetMessageId"] == "<wrap@contoso.com>"
    assert record["originalInternetMessageId"] == "<orig@fabrikam.com>"
    assert record["from"] == "carol@fabrikam.com"  # the original's sender, as the user saw it
    plain = decision_record(message(), plan_inbound(message(), context()))
    assert "trackedFor" not in plain and plain["subject"] == message().subject


def test_auto_created_contact_fits_the_contact_columns() -> None:
    # contact.md: firstname/lastname String(50), emailaddress1 String(100); a longer value fails the change set
    long_local = "x" * 60
    m = message(from_=addr(f"{long_local}@fabrikam.example", ""))
    plan = plan_inbound(m, context(directory={}, mailbox=user_mailbox(auto_create_contacts=True)))
    assert isinstance(plan, TrackEmail) and plan.new_contact is not None
    assert len(plan.new_contact.last_name) <= 50 and len(plan.new_contact.first_name) <= 50
    too_long = message(from_=addr(("y" * 95) + "@fabrikam.example", "Y"))
    plan = plan_inbound(too_long, context(directory={}, mailbox=user_mailbox(auto_create_contacts=True)))
    assert isinstance(plan, TrackEmail) and plan.new_contact is None
