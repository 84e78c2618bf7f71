"""The whole pipeline through the real local Functions host (issues 5 and 6, "closing the loop"), no in-process
shortcuts: the stack runs as subprocesses (tests/e2e/stack_harness.py), the org comes from the emulators' seed
endpoints and the router's own CRM sync, subscriptions from its reconcile timer.

1. SMTP in -> Graph notification -> webhook -> inbound-mail queue -> processor -> one CRM email, Received, owned by
   the individual-mailbox user, with the right parties.
2. CRM SendEmail (IssueSend) for a router user -> outbound scan -> sender -> the outbox, from that user, token in the
   subject, a Sent Items copy, the CRM email Sent (status only, never re-opened) under a Message-ID naming it.
3. The external recipient replies over SMTP (In-Reply-To = that Message-ID) -> the reply is tracked regarding the
   same record as the sent email, with the sent email as its parent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.domain.identity import outbound_activity_id
from tests.e2e.stack_harness import (
    CONTACT_FIONA,
    FABRIKAM_ACCOUNT,
    FILTER_ALL,
    INDIVIDUAL,
    ROUTER,
    Org,
    Stack,
    activity_id_for,
    build_org,
    make_mail,
    poll,
    running_stack,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEADLINE = 300.0  # generous: a loaded 2-core CI machine; polls return as soon as the state is reached


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Org]]:
    workdir = Path(tmp_path_factory.mktemp("e2e-stack"))
    with running_stack(workdir, extra_values={"OUTBOUND_SCAN_SCHEDULE": "*/5 * * * * *"}) as stack:
        org = build_org(8)
        stack.seed_org(org)
        stack.start_host()
        stack.sync_and_subscribe(org)
        yield stack, org


def email(stack: Stack, activity_id: str) -> dict[str, Any] | None:
    rows = stack.dv_list(
        f"emails?$filter=activityid eq {activity_id}&$select=activityid,subject,messageid,statecode,statuscode,"
        "_ownerid_value,_regardingobjectid_value,_parentactivityid_value,trackingtoken,directioncode"
        "&$expand=email_activity_parties($select=participationtypemask,addressused,_partyid_value)")
    return rows[0] if rows else None


def router_user(org: Org) -> Any:
    return next(m for m in org.users
                if m.inbound == INDIVIDUAL and m.filter == FILTER_ALL and m.routes_outbound and m.outbound == ROUTER)


@pytest.mark.timeout(900)
def test_smtp_in_send_out_and_the_reply_closes_the_loop(e2e: tuple[Stack, Org]) -> None:
    stack, org = e2e
    user = router_user(org)
    fiona, fiona_id = CONTACT_FIONA

    # 1. SMTP in -> CRM email, through the webhook and the queue.
    notifications_before = stack.executed_count("graph_notifications")
    mid = f"<e2e-in-{uuid.uuid4().hex}@fabrikam.example>"
    stack.smtp_send([make_mail(fiona, [user.address], f"E2E inbound {org.tag}", message_id=mid)])
    row = poll("the inbound mail as a CRM email", lambda: email(stack, activity_id_for(mid)), within=DEADLINE)
    assert (row["statecode"], row["statuscode"]) == (1, 4)  # Received
    assert row["_ownerid_value"] == user.crm_id
    parties = {(p["participationtypemask"], p["_partyid_value"]) for p in row["email_activity_parties"]}
    assert parties == {(1, fiona_id), (2, user.crm_id)}
    assert stack.executed_count("graph_notifications") > notifications_before  # it came through the webhook
    assert "Functions.inbound_processor" in stack.host_log_text()

    # 2. CRM SendEmail for the router user -> outbox, Sent Items, CRM Sent (status only: never re-opened, so no
    #    messageid in CRM; the router's Message-ID names the CRM email).
    subject = f"E2E quote {org.tag}"
    created = stack.dv("POST", "emails", {
        "subject": subject, "description": "<p>Our quote</p>", "directioncode": True,
        "regardingobjectid_account_email@odata.bind": f"/accounts({FABRIKAM_ACCOUNT})",
        "email_activity_parties": [
            {"participationtypemask": 1, "partyid_systemuser@odata.bind": f"/systemusers({user.crm_id})"},
            {"participationtypemask": 2, "partyid_contact@odata.bind": f"/contacts({fiona_id})"}]},
        headers={"Prefer": "return=representation"}).json()
    sent_id = str(created["activityid"])
    stack.dv("POST", f"emails({sent_id})/Microsoft.Dynamics.CRM.SendEmail", {"IssueSend": True, "TrackingToken": ""})
    pending = email(stack, sent_id)
    assert pending is not None and (pending["statecode"], pending["statuscode"]) == (1, 6) and pending["trackingtoken"]

    def sent() -> dict[str, Any] | None:
        r = email(stack, sent_id)
        return r if r and (r["statecode"], r["statuscode"]) == (1, 3) else None

    sent_row = poll("the CRM email Sent", sent, within=DEADLINE)
    outbox = [m for m in stack.outbox() if subject in str(m.get("subject"))]
    assert len(outbox) == 1, outbox
    assert user.address in str(outbox[0]["from"]).lower()
    assert pending["trackingtoken"] in outbox[0]["subject"]
    sent_mid = outbox[0]["messageId"]
    assert not sent_row["messageid"] and outbound_activity_id(sent_mid) == uuid.UUID(sent_id)
    copies = stack.graph("GET", f"users/{user.address}/mailFolders/sentitems/messages",
                         params={"$filter": f"internetMessageId eq '{sent_mid}'",
                                 "$select": "id,subject,isDraft"})["value"]
    assert len(copies) == 1 and copies[0]["isDraft"] is False

    # 3. The external reply correlates back to the same regarding record.
    reply_mid = f"<e2e-reply-{uuid.uuid4().hex}@fabrikam.example>"
    stack.smtp_send([make_mail(fiona, [user.address], f"RE: {outbox[0]['subject']}", message_id=reply_mid,
                               in_reply_to=sent_mid)])
    reply = poll("the reply as a CRM email", lambda: email(stack, activity_id_for(reply_mid)), within=DEADLINE)
    assert reply["_regardingobjectid_value"] == FABRIKAM_ACCOUNT == sent_row["_regardingobjectid_value"]
    assert reply["_parentactivityid_value"] == sent_id
    assert reply["_ownerid_value"] == user.crm_id
