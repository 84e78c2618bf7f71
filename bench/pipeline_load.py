"""The pipeline benchmark's org, seeding and load: 50 mailboxes of mixed inbound methods seeded through the emulators'
``/_emulator/seed`` endpoints and the CRM Web API, the router's own CRM sync and subscription reconcile, SMTP
senders on a schedule (or as fast as possible) and a light poller that notices each CRM email row.

Timing: every time here is ``time.monotonic()`` of this process (sender and poller share it). A mail's start is the
moment the SMTP server accepted it (``send_message`` returned: the emulator delivers into the mailbox inside the
DATA command); its end is the first poll whose answer contains its CRM row (Dataverse's ``createdon`` has whole
seconds only, too coarse for a sub-second target).
"""

from __future__ import annotations

import smtplib
import threading
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from local.stack import Stack

DOMAIN = "contoso.example"
NONE, OUTLOOK, ROUTER, FORWARD = 0, 1, 2, 3
FILTER_ALL = 0
# The poller's own query; its fixed prefix tells its requests apart in the Dataverse request log.
POLL_PATH = "emails?$select=messageid,modifiedon&$filter=modifiedon ge "
POLL_LOG_PREFIX = "/api/data/v9.2/emails?$select=messageid,modifiedon"


def object_id(address: str) -> str:
    """Entra object id = Graph user id = CRM azureactivedirectoryobjectid (the demo org's convention)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"entra/user/{address.lower()}"))


def crm_user_id(address: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-pipeline/systemuser/{address.lower()}"))


def norm_id(message_id: str) -> str:
    return message_id.strip().strip("<>").strip().lower()


@dataclass(frozen=True)
class BenchMailbox:
    local: str
    inbound: int

    @property
    def address(self) -> str:
        return f"{self.local}@{DOMAIN}"

    @property
    def tracked(self) -> bool:
        """Mail to it must become a CRM email (individual mailbox or forward user, filter "all")."""
        return self.inbound in (ROUTER, FORWARD)

    @property
    def watched(self) -> bool:
        return self.inbound == ROUTER


@dataclass(frozen=True)
class BenchOrg:
    mailboxes: tuple[BenchMailbox, ...]
    sink: BenchMailbox
    contacts: tuple[str, ...]

    @property
    def watched_mailboxes(self) -> list[BenchMailbox]:
        return [m for m in (*self.mailboxes, self.sink) if m.watched]

    def describe(self) -> str:
        count = {k: sum(1 for m in self.mailboxes if m.inbound == k) for k in (ROUTER, FORWARD, OUTLOOK, NONE)}
        return (f"{len(self.mailboxes)} mailboxes: {count[ROUTER]} individual (filter all), {count[FORWARD]} forward "
                f"users through 1 sink, {count[OUTLOOK]} Outlook, {count[NONE]} None")

    # -- what the stack driver seeds and waits for (local.stack.StackOrg)

    def graph_seed(self) -> dict[str, Any]:
        users: list[dict[str, Any]] = []
        for m in (*self.mailboxes, self.sink):
            user: dict[str, Any] = {"id": object_id(m.address), "userPrincipalName": m.address,
                                    "displayName": m.local, "mail": m.address}
            if m.inbound == FORWARD:  # the Rule Deployment Wizard's rule: forward as an attachment to the sink
                # no "id": the emulator keys rules by id, a shared one would leave only the last user's rule
                user["rules"] = [{"displayName": "Track in Dynamics 365", "sequence": 1, "isEnabled": True,
                                  "conditions": {}, "actions": {
                                      "forwardAsAttachmentTo": [{"emailAddress": {"address": self.sink.address}}]}}]
            users.append(user)
        return {"domains": [DOMAIN], "users": users}

    def dataverse_seed(self) -> dict[str, Any]:
        systemusers = [{
            "systemuserid": crm_user_id(m.address), "firstname": "Bench", "lastname": m.local,
            "internalemailaddress": m.address, "domainname": m.address,
            "azureactivedirectoryobjectid": object_id(m.address),
            "incomingemaildeliverymethod": m.inbound, "outgoingemaildeliverymethod": NONE,
            "emailrouteraccessapproval": 0 if m.inbound == NONE else 1,
            "isemailaddressapprovedbyo365admin": m.inbound != NONE,
            "usersettings": {"incomingemailfilteringmethod": FILTER_ALL},
        } for m in self.mailboxes]
        contacts = [{"contactid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-pipeline/contact/{c}")),
                     "firstname": "Customer", "lastname": c.split("@")[0], "emailaddress1": c} for c in self.contacts]
        return {"systemusers": systemusers, "contacts": contacts}

    def crm_records(self) -> Sequence[tuple[str, Mapping[str, Any]]]:
        # The CRM forward mailbox record (no seed section exists for it). No regarding user/queue: Dataverse makes
        # it a forward mailbox (isforwardmailbox is read-only, default Yes); only create-valid columns (mailbox.md).
        return [("mailboxes", {
            "name": "Bench forward mailbox", "emailaddress": self.sink.address,
            "incomingemaildeliverymethod": ROUTER, "outgoingemaildeliverymethod": NONE,
            "emailrouteraccessapproval": 1, "processanddeleteemails": False})]

    @property
    def mailbox_addresses(self) -> Collection[str]:
        return [m.address for m in (*self.mailboxes, self.sink)]

    @property
    def watched(self) -> Collection[tuple[str, str | None]]:
        return [(m.address, object_id(m.address)) for m in self.watched_mailboxes]

    @property
    def caller_id(self) -> str | None:
        return None  # seeding runs as the application user


def build_org(n: int = 50) -> BenchOrg:
    # 80% individual mailboxes, 8% forward users, 6% Outlook, 6% None: the methods of DESIGN.md §5's "mixed".
    pattern = [ROUTER] * 40 + [FORWARD] * 4 + [OUTLOOK] * 3 + [NONE] * 3
    prefix = {ROUTER: "ind", FORWARD: "fwd", OUTLOOK: "olk", NONE: "non"}
    boxes = tuple(BenchMailbox(f"{prefix[kind]}{i:02d}", kind) for i, kind in enumerate(pattern[:n]))
    contacts = tuple(f"customer{i:02d}@customer{i % 5}.example" for i in range(20))
    return BenchOrg(boxes, BenchMailbox("bench-sink", ROUTER), contacts)


# ------------------------------------------------------------------------------------------------ mail


@dataclass
class Sent:
    message_id: str  # normalised
    recipient: BenchMailbox
    due: float
    accepted: float | None = None
    error: str = ""


def make_mails(org: BenchOrg, count: int, tag: str, *, tracked_only: bool = False) -> list[tuple[Sent, EmailMessage]]:
    """``count`` mails round-robin over the mailboxes; 70% from CRM contacts, 30% from a new stranger each time
    (so party lookups are not all answered by the router's cache)."""
    targets = [m for m in org.mailboxes if m.tracked or not tracked_only]
    out: list[tuple[Sent, EmailMessage]] = []
    for i in range(count):
        rcpt = targets[i % len(targets)]
        sender = org.contacts[i % len(org.contacts)] if i % 10 < 7 else f"stranger-{tag}-{i}@unknown{i % 7}.example"
        mid = f"<{tag}-{i}-{uuid.uuid4().hex[:8]}@bench.example>"
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = sender, rcpt.address, f"bench {tag} {i}"
        msg["Message-ID"], msg["Date"] = mid, formatdate(localtime=False)
        msg.set_content(f"Benchmark mail {i} of run {tag}.\n\nRegards,\nA customer\n")
        out.append((Sent(norm_id(mid), rcpt, 0.0), msg))
    return out


def send_mails(stack: Stack, mails: Sequence[tuple[Sent, EmailMessage]], *, rate: float | None,
               connections: int = 4, cap_s: float = 120.0) -> dict[str, Any]:
    """Send over ``connections`` SMTP sessions. With ``rate``, mail *i* is due at ``t0 + i/rate`` (open loop: a late
    sender does not slow the schedule); without, as fast as the listener accepts. Stops at ``cap_s``."""
    host, port = stack.smtp
    t0 = time.monotonic() + 0.2
    stop_at = t0 + cap_s
    for i, (sent, _) in enumerate(mails):
        sent.due = t0 + i / rate if rate else t0

    def worker(k: int) -> None:
        client: smtplib.SMTP | None = None
        try:
            for i in range(k, len(mails), connections):
                sent, msg = mails[i]
                wait = sent.due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if time.monotonic() > stop_at:
                    sent.error = "not sent: time cap"
                    continue
                for attempt in range(2):
                    try:
                        if client is None:
                            client = smtplib.SMTP(host, port, timeout=30)
                        client.send_message(msg)
                        sent.accepted = time.monotonic()
                        break
                    except (smtplib.SMTPException, OSError) as exc:
                        sent.error = f"{type(exc).__name__}: {str(exc)[:80]}"
                        client = None
                        if attempt:
                            break
        finally:
            if client is not None:
                try:
                    client.quit()
                except (smtplib.SMTPException, OSError):
                    pass

    threads = [threading.Thread(target=worker, args=(k,), daemon=True, name=f"smtp-{k}") for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(cap_s + 60)
    accepted = [s.accepted for s, _ in mails if s.accepted is not None]
    late = [s.accepted - s.due for s, _ in mails if s.accepted is not None]
    span = (max(accepted) - t0) if accepted else 0.0
    return {"sent": len(accepted), "failed": len(mails) - len(accepted), "span_s": round(span, 2),
            "rate_per_s": round(len(accepted) / span, 1) if span > 0 else 0.0,
            "max_lag_s": round(max(late), 3) if late else 0.0,
            "errors": sorted({s.error for s, _ in mails if s.accepted is None})[:3]}


# ------------------------------------------------------------------------------------------------ poller


@dataclass
class RowPoller:
    """One light ``modifiedon ge T`` sweep of ``emails`` every ``interval`` s (indexed column; T = newest seen
    minus 2 s, since the column has whole seconds); records when each message id was first seen."""

    stack: Stack
    caller_id: str = ""  # MSCRMCallerID: the poller's requests count against this user's service protection
    interval: float = 0.1
    seen: dict[str, float] = field(default_factory=dict)
    requests: int = 0
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _since: str = "2000-01-01T00:00:00Z"
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="row-poller")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seen)

    def _run(self) -> None:
        client = self.stack.http
        while not self._stop.is_set():
            started = time.monotonic()
            url: str | None = f"{self.stack.dataverse_api_url}/{POLL_PATH}{self._since}"
            newest = self._since
            for _ in range(50):  # pages of one sweep (bounded)
                if url is None:
                    break
                try:
                    headers = {**self.stack.dv_headers(), "Prefer": "odata.maxpagesize=1000"}
                    if self.caller_id:
                        headers["MSCRMCallerID"] = self.caller_id
                    r = client.get(url, headers=headers, timeout=30)
                    self.requests += 1
                    now = time.monotonic()
                    if r.status_code != 200:
                        self.errors += 1
                        break
                    body = r.json()
                except Exception:  # a failed poll is counted and retried at the next tick
                    self.errors += 1
                    break
                with self._lock:
                    for row in body.get("value", []):
                        mid = norm_id(str(row.get("messageid") or ""))
                        if mid and mid not in self.seen:
                            self.seen[mid] = now
                        newest = max(newest, str(row.get("modifiedon") or newest))
                url = body.get("@odata.nextLink")
            self._since = _minus_seconds(newest, 2)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))


def _minus_seconds(stamp: str, seconds: int) -> str:
    from datetime import datetime, timedelta

    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00")) - timedelta(seconds=seconds)
    except ValueError:
        return stamp
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_rows(poller: RowPoller, expected: set[str], *, within: float) -> float:
    """Wait until every expected id has been seen or ``within`` elapsed; returns when it stopped waiting."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if expected <= set(poller.snapshot()):
            break
        time.sleep(0.1)
    return time.monotonic()
