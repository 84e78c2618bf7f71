"""Outbound chaos (issue 10): M CRM emails put in Pending Send by SendEmail for the org's router senders, sent by the
real host (scan timer -> queue -> sender) while Graph and Dataverse inject ~10 % faults and the host is SIGKILLed
and restarted mid-run.

Final state: the emulator's outbox holds each email at most once and every Sent one exactly once (with the
Message-ID the router's ledger recorded; CRM keeps none for sent mail); every CRM email ends Sent, or Failed with a
reason in the router's ledger; none is left in Pending Send, Sending or a Draft. Emails of senders the router
must not serve (Outlook, unapproved) stay untouched in Pending Send and never reach the outbox.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from tests.chaos.conftest import ChaosEnv
from tests.chaos.faults import inject, read_counters, reset_counters
from tests.e2e.stack_harness import KNOWN_SENDERS, OUTLOOK, ROUTER, Stack, poll

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.e2e]

SENT, FAILED, PENDING_SEND, SENDING = (1, 3), (0, 8), (1, 6), (1, 7)


def crm_send(stack: Stack, sender_id: str, subject: str, recipient: tuple[str, str]) -> str:
    """What a CRM user does: an email with parties, then SendEmail(IssueSend=true) -> Pending Send + token."""
    _address, record_id = recipient
    table = "contacts" if "1e01" not in record_id else "leads"
    nav = "partyid_contact" if table == "contacts" else "partyid_lead"
    r = stack.dv("POST", "emails", {
        "subject": subject, "description": f"<p>{subject}</p>", "directioncode": True,
        "email_activity_parties": [
            {"participationtypemask": 1, "partyid_systemuser@odata.bind": f"/systemusers({sender_id})"},
            {"participationtypemask": 2, f"{nav}@odata.bind": f"/{table}({record_id})"},
        ]}, headers={"Prefer": "return=representation"})
    email_id = str(r.json()["activityid"])
    stack.dv("POST", f"emails({email_id})/Microsoft.Dynamics.CRM.SendEmail", {"IssueSend": True, "TrackingToken": ""})
    return email_id


def crm_states(stack: Stack, marker: str) -> dict[str, dict[str, Any]]:
    rows = stack.dv_list("emails?$select=activityid,subject,statecode,statuscode,messageid,deliveryattempts,"
                         f"trackingtoken&$filter=contains(subject,'{marker}')")
    return {str(r["activityid"]): r for r in rows}


@pytest.mark.timeout(1800)
def test_outbound_chaos_sends_each_email_once_and_none_is_stuck(chaos_env: ChaosEnv) -> None:
    stack, org, sizes = chaos_env.stack, chaos_env.org, chaos_env.sizes
    marker = f"chaos-{org.tag}-out"
    senders = [m for m in org.users if m.routes_outbound]
    ignored = [m for m in org.users if m.outbound == OUTLOOK or (m.outbound == ROUTER and not m.routes_outbound)]
    assert len(senders) >= 3 and ignored

    reset_counters(stack)
    inject(stack, notifications=False)
    t0 = time.monotonic()
    recipients = itertools.cycle(KNOWN_SENDERS)
    emails: dict[str, str] = {}  # activity id -> subject
    for i in range(sizes.outbound_emails):
        subject = f"[{marker}] quote {i}"
        emails[crm_send(stack, senders[i % len(senders)].crm_id, subject, next(recipients))] = subject
    left_alone = {crm_send(stack, m.crm_id, f"[{marker}] not ours {m.local}", next(recipients)): m.local
                  for m in ignored[:3]}
    created_in = time.monotonic() - t0

    def count(states: dict[str, dict[str, Any]], *wanted: tuple[int, int]) -> int:
        return sum(1 for e in emails if (states[e]["statecode"], states[e]["statuscode"]) in wanted)

    poll("a third of the emails Sent", lambda: count(crm_states(stack, marker), SENT) >= len(emails) // 3 or None,
         within=900, every=1.0)
    sent_at_kill = count(crm_states(stack, marker), SENT)
    stack.kill_host()
    killed_at = time.monotonic() - t0
    time.sleep(3)
    stack.start_host()

    def finished() -> dict[str, dict[str, Any]] | None:
        states = crm_states(stack, marker)
        return states if count(states, SENT, FAILED) == len(emails) else None

    poll("every email Sent or Failed", finished, within=1200, every=2.0,
         detail=lambda: str(sorted({(s["statecode"], s["statuscode"]) for s in crm_states(stack, marker).values()})))
    finished_after = time.monotonic() - t0
    # The scan/reaper keep running: give a late duplicate (a second send after the finish) time to show up.
    time.sleep(20)
    report = read_counters(stack)
    stack.clear_faults()

    states = crm_states(stack, marker)
    outbox = [m for m in stack.outbox() if marker in str(m.get("subject"))]
    per_subject: dict[str, list[dict[str, Any]]] = {}
    for m in outbox:
        key = next((s for s in emails.values() if str(m["subject"]).startswith(s + " ") or m["subject"] == s), None)
        per_subject.setdefault(key or f"? {m['subject']}", []).append(m)
    ledger = {str(e["PartitionKey"]): e for e in stack.table_rows("Outbound") if e.get("RowKey") == "state"}

    duplicates = {s: len(v) for s, v in per_subject.items() if len(v) > 1}
    strays = [s for s in per_subject if s.startswith("? ")]
    problems: list[str] = []
    n_sent = n_failed = 0
    for email_id, subject in emails.items():
        row = states[email_id]
        pair = (row["statecode"], row["statuscode"])
        copies = per_subject.get(subject, [])
        if pair == SENT:
            n_sent += 1
            if len(copies) != 1:
                problems.append(f"{subject}: Sent but {len(copies)} outbox copies")
            elif (recorded := str(ledger.get(email_id, {}).get("InternetMessageId") or "")) and \
                    copies[0]["messageId"].strip("<>") != recorded.strip("<>"):
                problems.append(f"{subject}: ledger Message-ID {recorded} != outbox {copies[0]['messageId']}")
            if row["trackingtoken"] and copies and row["trackingtoken"] not in copies[0]["subject"]:
                problems.append(f"{subject}: token {row['trackingtoken']} not in the sent subject")
        elif pair == FAILED:
            n_failed += 1
            entry = ledger.get(email_id)
            if not entry or not str(entry.get("LastError") or "").strip():
                problems.append(f"{subject}: Failed without a recorded reason ({entry})")
            if len(copies) > 1:
                problems.append(f"{subject}: Failed and {len(copies)} outbox copies")
        else:
            problems.append(f"{subject}: ended in {pair}")
    for email_id, who in left_alone.items():
        pair = (states[email_id]["statecode"], states[email_id]["statuscode"])
        if pair != PENDING_SEND:
            problems.append(f"{who}'s email (not a router sender) was touched: {pair}")
    failed_reasons = sorted({str(ledger.get(e, {}).get("LastError", ""))[:80] for e in emails
                             if (states[e]["statecode"], states[e]["statuscode"]) == FAILED})

    print(f"\noutbound chaos: {len(emails)} emails from {len(senders)} router senders (+{len(left_alone)} not ours), "
          f"created in {created_in:.0f}s; host SIGKILLed at {killed_at:.0f}s with {sent_at_kill} Sent; all final "
          f"after {finished_after:.0f}s: {n_sent} Sent, {n_failed} Failed {failed_reasons}; outbox {len(outbox)}, "
          f"duplicates {len(duplicates)}; {report.summary()}")
    assert not duplicates, duplicates
    assert not strays, strays
    assert not problems, "\n".join(problems[:20])
    assert n_sent + n_failed == len(emails)
    assert sum(report.graph_faulted.values()) > 0 and sum(report.dataverse_faulted.values()) > 0, report.summary()
