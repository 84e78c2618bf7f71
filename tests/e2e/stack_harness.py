"""Whole-stack tests (e2e and chaos): an org of mixed methods, seeded into the local stack, and mail helpers.

The stack itself is ``local.stack.Stack`` (the one driver; re-exported here as ``Stack``): :func:`running_stack`
starts Azurite and the three emulators on free ports in a temporary state dir and leaves the Functions host to the
test (``stack.start_host()`` after seeding; ``kill_host()`` SIGKILLs it, ``start_host()`` again restarts it). The
driver's methods are the test's own, independent view of CRM (``dv``, ``dv_list``), Graph (``graph``), the
emulators' admin APIs (``emulator``, ``clear_faults``, ``outbox``), the queues and tables (``queue_depth``,
``peek_queue``, ``put_raw_queue_message``, ``table_rows``, ``set_org_setting``), SMTP in (``smtp_send``) and the
host's admin API (``run_function``, ``executed_count``, ``host_log_text``).

Everything listens on 127.0.0.1; every wait is bounded by a deadline and polls often.
"""

from __future__ import annotations

import base64
import contextlib
import os
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from emulators.common.server import free_port
from local.stack import Stack, StackError, poll

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "contoso.example"
TENANT_ID = "c0ffee00-0000-4000-8000-000000000001"
APP_CLIENT_ID = "c0ffee00-0000-4000-8000-0000000000a1"
TABLE_PREFIX = "emailrouter"
ODATA = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}

# CRM option values (dataverse reference): delivery methods, filters, approval.
NONE, OUTLOOK, INDIVIDUAL, FORWARD = 0, 1, 2, 3
ROUTER = 2
FILTER_ALL, FILTER_REPLIES, FILTER_CONTACTS = 0, 1, 2
APPROVED, PENDING = 1, 2

# Demo CRM records of the Dataverse emulator's default seed (senders to resolve against).
FABRIKAM_ACCOUNT = "c0ffee00-0000-4000-8000-00000000ac01"
CONTACT_FIONA = ("fiona@fabrikam.example", "c0ffee00-0000-4000-8000-00000000c001")
CONTACT_GUS = ("gus@example.org", "c0ffee00-0000-4000-8000-00000000c002")
LEAD_LENA = ("lena@prospect.example", "c0ffee00-0000-4000-8000-000000001e01")
KNOWN_SENDERS: tuple[tuple[str, str], ...] = (CONTACT_FIONA, CONTACT_GUS, LEAD_LENA)

HarnessError = StackError  # the stack or a wait did not behave (the message carries the log tails)


def user_id(local: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"stack-harness/systemuser/{local}"))


def object_id(local: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"entra/user/{local}@{DOMAIN}"))


def queue_id(local: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"stack-harness/queue/{local}"))


# ------------------------------------------------------------------------------------------------ the org


@dataclass(frozen=True)
class OrgMailbox:
    """One mailbox of the seeded org, with the CRM values the router will read through the CRM sync."""

    local: str
    kind: str  # "user" | "queue" | "sink"
    inbound: int = NONE
    outbound: int = NONE
    filter: int = FILTER_ALL
    approval: int = APPROVED
    queue_owner: str | None = None  # local part of the queue's owning user

    @property
    def address(self) -> str:
        return f"{self.local}@{DOMAIN}"

    @property
    def crm_id(self) -> str:
        return queue_id(self.local) if self.kind == "queue" else user_id(self.local)

    @property
    def watched(self) -> bool:
        """The router reads this mailbox itself (Graph subscription + delta)."""
        return self.kind == "sink" or (self.inbound == INDIVIDUAL and self.approval == APPROVED)

    @property
    def routes_outbound(self) -> bool:
        return self.kind == "user" and self.outbound == ROUTER and self.approval == APPROVED


@dataclass(frozen=True)
class Org:
    tag: str
    mailboxes: tuple[OrgMailbox, ...]
    sink: OrgMailbox

    def by_address(self, address: str) -> OrgMailbox:
        for m in (*self.mailboxes, self.sink):
            if m.address == address.lower():
                return m
        raise KeyError(address)

    @property
    def users(self) -> list[OrgMailbox]:
        return [m for m in self.mailboxes if m.kind == "user"]

    @property
    def queues(self) -> list[OrgMailbox]:
        return [m for m in self.mailboxes if m.kind == "queue"]

    # -- what the driver seeds and waits for (local.stack.StackOrg)

    def graph_seed(self) -> dict[str, Any]:
        return graph_seed(self)

    def dataverse_seed(self) -> dict[str, Any]:
        return dataverse_seed(self)

    def crm_records(self) -> Sequence[tuple[str, Mapping[str, Any]]]:
        return [("mailboxes", sink_mailbox_record(self))]

    @property
    def mailbox_addresses(self) -> Collection[str]:
        return [m.address for m in (*self.mailboxes, self.sink)]

    @property
    def watched(self) -> Collection[tuple[str, str | None]]:
        return [(m.address, object_id(m.local) if m.kind == "user" else None)
                for m in (*self.mailboxes, self.sink) if m.watched]

    @property
    def caller_id(self) -> str | None:
        """The test's own Web API calls run as the first user, so they do not eat the router's budget."""
        return self.users[0].crm_id


# The mix of methods, repeated until the org has the requested size: individual mailboxes under each filter,
# forward-mailbox users, Outlook and None users, an unapproved user and router-watched queues.
_PATTERN: tuple[dict[str, Any], ...] = (
    {"kind": "user", "inbound": INDIVIDUAL, "outbound": ROUTER, "filter": FILTER_ALL},
    {"kind": "user", "inbound": FORWARD, "outbound": ROUTER, "filter": FILTER_ALL},
    {"kind": "user", "inbound": INDIVIDUAL, "outbound": NONE, "filter": FILTER_CONTACTS},
    {"kind": "user", "inbound": OUTLOOK, "outbound": OUTLOOK, "filter": FILTER_ALL},
    {"kind": "user", "inbound": INDIVIDUAL, "outbound": ROUTER, "filter": FILTER_REPLIES},
    {"kind": "queue", "inbound": INDIVIDUAL, "outbound": NONE, "filter": FILTER_ALL},
    {"kind": "user", "inbound": NONE, "outbound": NONE, "filter": FILTER_ALL},
    {"kind": "user", "inbound": INDIVIDUAL, "outbound": ROUTER, "filter": FILTER_ALL, "approval": PENDING},
)


def build_org(n_mailboxes: int, *, tag: str | None = None) -> Org:
    tag = tag or uuid.uuid4().hex[:6]
    boxes: list[OrgMailbox] = []
    owners: list[str] = []
    for i in range(n_mailboxes):
        spec = dict(_PATTERN[i % len(_PATTERN)])
        kind = spec.pop("kind")
        local = f"{'q' if kind == 'queue' else 'u'}{tag}{i:03d}"
        if kind == "queue":
            owner = owners[len(boxes) % len(owners)] if owners else None
            boxes.append(OrgMailbox(local, "queue", queue_owner=owner, **spec))
        else:
            boxes.append(OrgMailbox(local, "user", **spec))
            owners.append(local)
    return Org(tag, tuple(boxes), OrgMailbox(f"sink{tag}", "sink", inbound=INDIVIDUAL))


def graph_seed(org: Org) -> dict[str, Any]:
    users: list[dict[str, Any]] = []
    for m in (*org.mailboxes, org.sink):
        user: dict[str, Any] = {"userPrincipalName": m.address, "displayName": m.local, "mail": m.address}
        if m.kind == "user":
            user["id"] = object_id(m.local)
        if m.inbound == FORWARD:
            user["rules"] = [{
                "displayName": "Email Router: forward to CRM", "sequence": 1, "isEnabled": True, "conditions": {},
                "actions": {"forwardAsAttachmentTo": [{"emailAddress": {"address": org.sink.address}}]}}]
        users.append(user)
    return {"users": users}


def dataverse_seed(org: Org) -> dict[str, Any]:
    users = [{
        "systemuserid": m.crm_id, "firstname": "Chaos", "lastname": m.local,
        "internalemailaddress": m.address, "domainname": m.address, "azureactivedirectoryobjectid": object_id(m.local),
        "incomingemaildeliverymethod": m.inbound, "outgoingemaildeliverymethod": m.outbound,
        "emailrouteraccessapproval": m.approval, "isemailaddressapprovedbyo365admin": m.approval == APPROVED,
        "usersettings": {"incomingemailfilteringmethod": m.filter},
    } for m in org.users]
    queues = [{
        "queueid": m.crm_id, "name": f"Queue {m.local}", "emailaddress": m.address,
        "incomingemaildeliverymethod": m.inbound, "outgoingemaildeliverymethod": m.outbound,
        "emailrouteraccessapproval": m.approval, "incomingemailfilteringmethod": m.filter,
        "ownerid@odata.bind": f"/systemusers({user_id(m.queue_owner or org.users[0].local)})",
    } for m in org.queues]
    return {"systemusers": users, "queues": queues}


def sink_mailbox_record(org: Org) -> dict[str, Any]:
    """The CRM forward mailbox record (no seed section exists for mailboxes; created through the Web API)."""
    # Only create-valid columns (mailbox.md): isforwardmailbox is read-only and defaults to Yes for a mailbox
    # without a regarding user/queue; the enabledfor* flags default to Yes.
    return {"name": f"Forward mailbox {org.tag}", "emailaddress": org.sink.address,
            "incomingemaildeliverymethod": INDIVIDUAL, "outgoingemaildeliverymethod": NONE,
            "emailrouteraccessapproval": APPROVED, "processanddeleteemails": False}


# ------------------------------------------------------------------------------------------------ the stack


@contextlib.contextmanager
def running_stack(workdir: Path, *, extra_values: Mapping[str, str] | None = None,
                  lease_seconds: int = 600) -> Iterator[Stack]:
    """The local stack (local/stack.py's driver) in ``workdir`` on free ports, without a demo org (the test seeds its
    own), the Functions host *not yet* started: seed the org, then ``stack.start_host()``. ``extra_values`` win over
    the generated app settings (compressed timers); ``lease_seconds`` shortens the host's queue-message lease so
    that a SIGKILLed host's messages come back soon. Service logs: ``workdir/<service>.log`` (``functions.log``).

    While it runs, this process trusts the stack's CA bundle: ``requests`` (under msal) lets ``REQUESTS_CA_BUNDLE``
    override a session's own ``verify`` (DESIGN.md §4), so product code called from the test works unchanged."""
    stack = Stack(workdir / "state", log_dir=workdir, seed="none", host_values=dict(extra_values or {}),
                  host_lease_seconds=lease_seconds, host_grace=5)
    saved = {name: os.environ.get(name) for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")}
    try:
        stack.start(host=False)
        os.environ.update(stack.client_env())
        yield stack
    finally:
        stack.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ------------------------------------------------------------------------------------------------ mail helpers


def make_mail(sender: str, to: list[str], subject: str, *, message_id: str, body: str = "Hello",
              in_reply_to: str | None = None, cc: list[str] | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"], msg["Message-ID"] = sender, ", ".join(to), subject, message_id
    if cc:
        msg["Cc"] = ", ".join(cc)
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(body)
    return msg


def activity_id_for(message_id: str) -> str:
    """What the router derives as the CRM activity id (kept independent: the test's expectation)."""
    from core.domain.identity import activity_id_for as product_id

    return str(product_id(message_id))


def email_rows(stack: Stack, subject_marker: str) -> list[dict[str, Any]]:
    marker = subject_marker.replace("'", "''")
    return stack.dv_list(
        "emails?$select=activityid,subject,messageid,statecode,statuscode,_ownerid_value,_regardingobjectid_value,"
        "trackingtoken,deliveryattempts,directioncode"
        "&$expand=email_activity_parties($select=participationtypemask,addressused,_partyid_value)"
        f"&$filter=contains(subject,'{marker}')")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


__all__ = [
    "APPROVED",
    "CONTACT_FIONA",
    "CONTACT_GUS",
    "FABRIKAM_ACCOUNT",
    "FILTER_ALL",
    "FILTER_CONTACTS",
    "FILTER_REPLIES",
    "FORWARD",
    "INDIVIDUAL",
    "KNOWN_SENDERS",
    "LEAD_LENA",
    "NONE",
    "OUTLOOK",
    "ROUTER",
    "HarnessError",
    "Org",
    "OrgMailbox",
    "Stack",
    "activity_id_for",
    "b64",
    "build_org",
    "email_rows",
    "free_port",
    "make_mail",
    "poll",
    "running_stack",
    "user_id",
]
