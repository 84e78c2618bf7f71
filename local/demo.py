"""``make demo``: the router on the Contoso demo org, end to end, with a pass/fail report.

    python -m local.demo [--keep] [--timeout 170] [--logs DIR] [--against STATE_DIR]

1. Starts a **fresh** stack (Azurite, identity, Graph and Dataverse emulators, the local Functions host) with the
   stack driver (``local.stack.Stack``) in a temporary state directory on free ports, seeded with
   ``local.demo_org``; the services' output goes to log files (default ``.local/demo/logs/<service>.log``), not to
   the terminal.
2. Runs the router's own timers through the host's admin API (CRM sync, subscription reconcile, outbound scan):
   the same functions production runs on a schedule, just now instead of in 15 minutes.
3. Drives the scenario through the real paths: mail from outside arrives over **SMTP** at the Graph emulator's
   listener; mail "from CRM" is an email created over the **Dataverse Web API** (as the user, impersonated) and
   sent with ``SendEmail``, exactly what the CRM UI does.
4. Observes the outcome where an admin would: CRM rows (emails, parties, attachments, regarding, owner, status)
   over the Web API, the Graph emulator's outbox and Sent Items, and the router's decision records (the table
   ``emailrouter explain`` reads).
5. Prints scenario / expected / observed / result, stops every process it started, removes the state directory
   (unless ``--keep``) and exits 0 only if every scenario held.

Scenarios are data (:func:`build_scenarios`) evaluated by polling with one overall deadline; nothing waits a fixed
time. ``run_demo()`` is the API the e2e test uses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from core.domain.identity import outbound_activity_id
from local import demo_org
from local.demo_org import CASE, CONTACTS, LEADS, OPPORTUNITY, QUEUE, QUEUE_OWNER, SINK, person
from local.send_test_mail import build_message, send_mail
from local.stack import Stack, StackError

__all__ = ["DemoResult", "Outcome", "build_scenarios", "main", "run_demo"]

ROOT: Final = Path(__file__).resolve().parent.parent
STRANGER: Final = "sam@unknown.example"
PROSPECT: Final = "kim@prospect.example"  # unknown to CRM: erin's filter 2 skips her mail until the admin acts
TRADE_FAIR: Final = "tia@tradefair.example"  # unknown to CRM: erin's filter 2 skips her mail; erin tracks it by hand
TRACK_CATEGORY: Final = "Tracked to Dynamics 365"
_POLL_S: Final = 0.5


# ================================================================================================ clients


class Org:
    """What the scenario needs from the running stack: tokens, Dataverse, Graph, the host admin API, tables."""

    def __init__(self, stack: Mapping[str, Any]) -> None:
        self.stack = stack
        self.bundle = str(stack["ca_bundle"])
        self.http = httpx.AsyncClient(verify=ssl.create_default_context(cafile=self.bundle), timeout=30)
        self.api = str(stack["dataverse"]["api_url"]).rstrip("/")
        self.org_url = str(stack["dataverse"]["url"]).rstrip("/")
        self.graph = str(stack["graph"]["base_url"]).rstrip("/")
        self.graph_root = str(stack["graph"]["url"]).rstrip("/")
        self.dataverse_root = self.org_url
        base = str(stack["functions"]["base_url"]).rstrip("/")
        self.host_root = base[: -len("/api")] if base.endswith("/api") else base
        self.admin_key = str(stack["functions"]["admin_key"])
        host, _, port = str(stack["graph"]["smtp"]).rpartition(":")
        self.smtp = (host, int(port))
        self._tokens: dict[str, tuple[float, str]] = {}
        self._storage: Any = None

    async def close(self) -> None:
        await self.http.aclose()
        if self._storage is not None:
            await self._storage.close()

    # -- tokens
    async def token(self, scope: str) -> str:
        hit = self._tokens.get(scope)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        authority = str(self.stack["identity"]["authority"]).rstrip("/")
        resp = await self.http.post(f"{authority}/oauth2/v2.0/token", data={
            "grant_type": "client_credentials", "client_id": self.stack["app"]["client_id"],
            "client_secret": self.stack["app"]["client_secret"], "scope": scope})
        resp.raise_for_status()
        body = resp.json()
        self._tokens[scope] = (time.monotonic() + max(30, int(body.get("expires_in", 300)) - 60),
                               str(body["access_token"]))
        return str(body["access_token"])

    # -- Dataverse
    async def _dv_headers(self, caller_object_id: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {await self.token(f'{self.org_url}/.default')}",
                   "Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0",
                   "Prefer": 'odata.include-annotations="*"'}
        if caller_object_id:
            headers["CallerObjectId"] = caller_object_id
        return headers

    async def dv_get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        resp = await self.http.get(f"{self.api}/{path}", params=params, headers=await self._dv_headers())
        resp.raise_for_status()
        return resp.json()

    async def dv_post(self, path: str, body: Mapping[str, Any], *, as_user: str | None = None) -> httpx.Response:
        headers = await self._dv_headers(as_user)
        headers["Prefer"] = "return=representation"
        resp = await self.http.post(f"{self.api}/{path}", json=body, headers=headers)
        resp.raise_for_status()
        return resp

    async def emails_by_message_id(self, message_id: str) -> list[dict[str, Any]]:
        core = message_id.strip().strip("<>").replace("'", "''")
        body = await self.dv_get("emails", {
            "$filter": f"messageid eq '<{core}>' or messageid eq '{core}'",
            "$select": "activityid,subject,messageid,statecode,statuscode,directioncode,trackingtoken,"
                       "_ownerid_value,_regardingobjectid_value,_parentactivityid_value",
            "$expand": "email_activity_parties($select=participationtypemask,_partyid_value,addressused)",
        })
        return list(body.get("value", []))

    async def email(self, activity_id: str) -> dict[str, Any]:
        return dict(await self.dv_get(f"emails({activity_id})", {
            "$select": "activityid,subject,messageid,statecode,statuscode,trackingtoken,_ownerid_value,"
                       "_regardingobjectid_value,deliveryattempts"}))

    async def attachments(self, activity_id: str) -> list[dict[str, Any]]:
        body = await self.dv_get("activitymimeattachments", {
            "$filter": f"_objectid_value eq {activity_id}", "$select": "filename,filesize,mimetype"})
        return list(body.get("value", []))

    # -- Graph
    async def graph_get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {await self.token('https://graph.microsoft.com/.default')}"}
        resp = await self.http.get(f"{self.graph}/{path}", params=params, headers=headers)
        resp.raise_for_status()
        return resp.json()

    async def outbox(self) -> list[dict[str, Any]]:
        resp = await self.http.get(f"{self.graph_root}/_emulator/outbox")
        resp.raise_for_status()
        body = resp.json()
        return list(body if isinstance(body, list) else body.get("value", []))

    async def subscriptions(self) -> list[dict[str, Any]]:
        resp = await self.http.get(f"{self.graph_root}/_emulator/subscriptions")
        resp.raise_for_status()
        return list(resp.json().get("value", []))

    # -- the Functions host
    async def functions(self) -> list[dict[str, Any]]:
        resp = await self.http.get(f"{self.host_root}/admin/functions",
                                   headers={"x-functions-key": self.admin_key})
        resp.raise_for_status()
        return list(resp.json())

    async def run_function(self, name: str) -> None:
        resp = await self.http.post(f"{self.host_root}/admin/functions/{name}", json={"input": ""},
                                    headers={"x-functions-key": self.admin_key})
        resp.raise_for_status()

    # -- Azure Tables (the router's state)
    def table(self, logical: str) -> Any:
        from core.adapters.storage import StorageAccount

        if self._storage is None:
            self._storage = StorageAccount(connection_string=str(self.stack["storage"]["connection_string"]))
        return self._storage.table(logical)

    async def decisions_for(self, message_id: str) -> list[dict[str, Any]]:
        """The router's decision records of one message, every mailbox (what ``emailrouter explain`` shows)."""
        from core.adapters.storage import join_text
        from core.names import DECISIONS_TABLE

        core = message_id.strip().strip("<>")
        out: list[dict[str, Any]] = []
        try:
            async for e in self.table(DECISIONS_TABLE).query(
                    "InternetMessageId eq @a or InternetMessageId eq @b", parameters={"a": f"<{core}>", "b": core}):
                try:
                    out.append(dict(json.loads(join_text(e, "Record"))))
                except ValueError:
                    out.append({"outcome": str(e.get("Outcome", "")), "mailbox": str(e.get("PartitionKey", ""))})
        except Exception as exc:  # the table may not exist before the first decision
            if "TableNotFound" not in type(exc).__name__ + str(exc):
                raise
        return out

    async def mailbox_rows(self) -> list[dict[str, Any]]:
        from core.names import MAILBOXES_TABLE
        from core.settings.rows import MAILBOX_PARTITION

        return [dict(e) async for e in self.table(MAILBOXES_TABLE).list_partition(MAILBOX_PARTITION)]


def _name(row: Mapping[str, Any], column: str) -> str:
    """The display name Dataverse annotates a lookup with (or the id)."""
    return str(row.get(f"{column}@OData.Community.Display.V1.FormattedValue") or row.get(column) or "-")


def _table_of(row: Mapping[str, Any], column: str) -> str:
    return str(row.get(f"{column}@Microsoft.Dynamics.CRM.lookuplogicalname") or "")


def _parties(row: Mapping[str, Any], mask: int) -> list[dict[str, Any]]:
    return [p for p in row.get("email_activity_parties") or [] if p.get("participationtypemask") == mask]


def _party_text(p: Mapping[str, Any]) -> str:
    if p.get("_partyid_value"):
        return f"{_table_of(p, '_partyid_value')} {_name(p, '_partyid_value')}"
    return f"unresolved {p.get('addressused')}"


# ================================================================================================ scenarios


@dataclass
class Outcome:
    passed: bool
    observed: str


@dataclass
class Scenario:
    key: str
    title: str
    expected: str
    check: Callable[[Org, dict[str, Any]], Awaitable[Outcome]]
    final_only: bool = False  # a negative that only means something once everything else settled
    outcome: Outcome = field(default_factory=lambda: Outcome(False, "not observed yet"))


def _mid(tag: str) -> str:
    return f"<demo-{tag}-{uuid.uuid4().hex[:12]}@mail.demo.example>"


@dataclass
class InboundMail:
    key: str
    sender: str
    to: tuple[str, ...]
    subject: str
    body: str
    sender_name: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    attachments: tuple[tuple[str, bytes, str], ...] = ()
    message_id: str = ""


def _inbound_mails() -> list[InboundMail]:
    erin, frank, grace, alice = (person(a).address for a in ("erin", "frank", "grace", "alice"))
    fiona, gus, nora = CONTACTS
    lena = LEADS[0]
    pdf = b"%PDF-1.4\n% demo invoice\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    return [
        # sent first: negatives about mailboxes the router must not touch settle while the rest is processed
        InboundMail("outlook", fiona.email, (person("carol").address,), "Workshop agenda",
                    "Carol, here is the agenda.", "Fiona Fabrikam"),
        InboundMail("none", fiona.email, (person("dave").address,), "Welcome aboard", "Hi Dave!",
                    "Fiona Fabrikam"),
        InboundMail("individual", nora.email, (erin,), "Quarterly review", "Erin, can we meet next week?",
                    "Nora North"),
        InboundMail("filter2-stranger", STRANGER, (erin,), "Partnership offer", "We sell leads.", "Sam"),
        InboundMail("filter3", person("carol").address, (frank,), "Customer escalation",
                    "Frank, please have a look.", "Carol Clark"),
        InboundMail("filter4", nora.email, (grace,), "Invoice question", "Grace, about invoice 42...", "Nora North"),
        InboundMail("filter1-new", fiona.email, (alice,), "A new question", "Alice, unrelated question.",
                    "Fiona Fabrikam"),
        InboundMail("queue-attachment", STRANGER, (QUEUE.address,), "Invoice 2024-17", "Invoice attached.", "Sam",
                    attachments=(("invoice.pdf", pdf, "application/pdf"),)),
        InboundMail("two-users", lena.email, (erin, frank), "Pricing for 50 seats", "Hello both, ...", "Lena Lead"),
        InboundMail("auto-reply", STRANGER, (QUEUE.address,), "Automatic reply: Invoice 2024-17",
                    "I am out of the office.", "Sam", headers={"Auto-Submitted": "auto-replied"}),
        InboundMail("forward", gus.email, (person("bob").address,), "Contract draft", "Bob, the draft is attached.",
                    "Gus Gray"),
        InboundMail("filter-change", PROSPECT, (erin,), "Introduction", "Erin, may I introduce our firm?", "Kim"),
        InboundMail("category", TRADE_FAIR, (erin,), "Nice meeting you at the fair", "Erin, as promised...", "Tia"),
    ]


def build_scenarios(mails: Mapping[str, InboundMail]) -> list[Scenario]:
    """Every scenario of issue 9 with its expectation, as checks over CRM rows / the outbox / decision records."""
    alice, bob, erin, frank = (person(a) for a in ("alice", "bob", "erin", "frank"))
    gus = CONTACTS[1]

    async def one_email(org: Org, key: str) -> tuple[dict[str, Any] | None, str]:
        rows = await org.emails_by_message_id(mails[key].message_id)
        if not rows:
            return None, "no CRM email yet"
        if len(rows) > 1:
            return None, f"{len(rows)} CRM emails for one message"
        return rows[0], ""

    def tracked(key: str, *, owner: str, sender: str, extra: Callable[[dict[str, Any]], Awaitable[str]] | None = None
                ) -> Callable[[Org, dict[str, Any]], Awaitable[Outcome]]:
        async def check(org: Org, ctx: dict[str, Any]) -> Outcome:
            row, why = await one_email(org, key)
            if row is None:
                return Outcome(False, why + await _decision_hint(org, mails[key].message_id))
            senders = [_party_text(p) for p in _parties(row, 1)]
            got_owner = _name(row, "_ownerid_value")
            observed = f"1 email, owner {got_owner}, from {', '.join(senders) or '-'}"
            ok = got_owner == owner and any(sender == s for s in senders)
            if extra is not None:
                more = await extra(row)
                observed += f"; {more.lstrip('!')}"
                ok = ok and not more.startswith("!")
            return Outcome(ok, observed)

        return check

    def not_tracked(key: str, *, reason_words: Sequence[str]) -> Callable[[Org, dict[str, Any]], Awaitable[Outcome]]:
        async def check(org: Org, ctx: dict[str, Any]) -> Outcome:
            rows = await org.emails_by_message_id(mails[key].message_id)
            if rows:
                return Outcome(False, f"tracked as {len(rows)} CRM email(s)")
            decisions = await org.decisions_for(mails[key].message_id)
            if not decisions:
                return Outcome(False, "no CRM email, and no decision recorded yet")
            outcome = "; ".join(sorted({str(d.get("outcome", "?")) for d in decisions}))
            text = json.dumps(decisions).lower()
            ok = all(str(d.get("outcome", "")).startswith("skipped") for d in decisions) and any(
                w in text for w in reason_words)
            return Outcome(ok, f"no CRM email; decision {outcome}")

        return check

    def untouched(key: str) -> Callable[[Org, dict[str, Any]], Awaitable[Outcome]]:
        async def check(org: Org, ctx: dict[str, Any]) -> Outcome:
            rows = await org.emails_by_message_id(mails[key].message_id)
            decisions = await org.decisions_for(mails[key].message_id)
            if rows:
                return Outcome(False, f"tracked as {len(rows)} CRM email(s)")
            hint = f"; decision {decisions[0].get('outcome')}" if decisions else "; mailbox not watched"
            if not ctx.get("settled"):
                # Sent before the tracked scenarios: "no row" only means something once those were tracked.
                return Outcome(False, "no CRM email, but inconclusive: the router tracked nothing sent after it")
            return Outcome(True, "no CRM email" + hint)

        return check

    async def settings(org: Org, ctx: dict[str, Any]) -> Outcome:
        from core.settings.rows import RowError, parse_mailbox_row

        rows = await org.mailbox_rows()
        configs = {c.address: c for c in (parse_mailbox_row(r) for r in rows) if not isinstance(c, RowError)}
        want = [p.address for p in demo_org.PEOPLE] + [QUEUE.address, SINK.address]
        missing = [a for a in want if a not in configs]
        if missing:
            return Outcome(False, f"{len(configs)} mailbox rows; missing {', '.join(a.split('@')[0] for a in missing)}")
        bob_cfg = configs[bob.address]
        methods = ", ".join(f"{a.split('@')[0]}={configs[a].inbound_method.name.lower()}" for a in want[:5])
        ok = (bob_cfg.forward_sink_address == SINK.address
              and all(int(configs[p.address].inbound_method) == p.incoming for p in demo_org.PEOPLE)
              and all(int(configs[p.address].tracking_filter) == p.tracking_filter for p in demo_org.PEOPLE))
        return Outcome(ok, f"{len(configs)} rows ({methods}, ...); bob -> {bob_cfg.forward_sink_address}")

    async def subscriptions(org: Org, ctx: dict[str, Any]) -> Outcome:
        subs = await org.subscriptions()
        by_id = {p.object_id: p.alias for p in demo_org.PEOPLE} | {QUEUE.object_id: QUEUE.alias,
                                                                   SINK.object_id: SINK.alias}
        watched = sorted({by_id.get(str(s.get("_userId")), str(s.get("_userId"))) for s in subs})
        want = sorted(["alice", "erin", "frank", "grace", "hana", QUEUE.alias, SINK.alias])
        return Outcome(watched == want, "subscribed: " + (", ".join(watched) or "none"))

    async def two_users(org: Org, ctx: dict[str, Any]) -> Outcome:
        rows = await org.emails_by_message_id(mails["two-users"].message_id)
        if len(rows) != 1:
            return Outcome(False, f"{len(rows)} CRM emails" + await _decision_hint(org, mails["two-users"].message_id))
        to = [_party_text(p) for p in _parties(rows[0], 2)]
        ok = f"systemuser {erin.name}" in to and f"systemuser {frank.name}" in to
        return Outcome(ok, f"1 CRM email; To: {', '.join(to)}")

    async def queue_attachment(org: Org, ctx: dict[str, Any]) -> Outcome:
        base = await tracked("queue-attachment", owner=person(QUEUE_OWNER).name,
                             sender=f"unresolved {STRANGER}")(org, ctx)
        rows = await org.emails_by_message_id(mails["queue-attachment"].message_id)
        if not rows:
            return base
        files = await org.attachments(rows[0]["activityid"])
        names = [f"{f.get('filename')} ({f.get('filesize')} B)" for f in files]
        ok = base.passed and [f.get("filename") for f in files] == ["invoice.pdf"]
        return Outcome(ok, f"{base.observed}; attachments: {', '.join(names) or 'none'}")

    async def forward(org: Org, ctx: dict[str, Any]) -> Outcome:
        return await tracked("forward", owner=bob.name, sender=f"contact {gus.name}")(org, ctx)

    # -- outbound and the loop back
    async def outbound(org: Org, ctx: dict[str, Any], key: str) -> tuple[Outcome, dict[str, Any] | None]:
        sent = ctx.setdefault("sent", {}).get(key)
        if sent is None:
            return Outcome(False, "not sent from CRM (see above)"), None
        row = await org.email(sent["activityid"])
        status = _name(row, "statuscode")
        if row.get("statuscode") != 3:
            detail = f"CRM status {status}"
            if row.get("deliveryattempts"):
                detail += f", {row.get('deliveryattempts')} attempt(s)"
            return Outcome(False, detail), None
        token = str(row.get("trackingtoken") or "")
        # CRM keeps no messageid for sent mail (the email is never re-opened); the router's Message-ID names the
        # CRM email (core.domain.identity.outbound_message_id), the tracking token is in the subject.
        out = [m for m in await org.outbox()
               if str(outbound_activity_id(str(m.get("messageId", "")))) == str(sent["activityid"])
               or (token and token in str(m.get("subject", "")))]
        if not out:
            return Outcome(False, f"CRM Sent (token {token or '-'}); not in the outbox"), None
        msg = out[0]
        mid = str(msg.get("messageId") or "")
        ctx.setdefault("sent_message_ids", {})[key] = mid
        sent_items = await org.graph_get(f"users/{alice.object_id}/mailFolders/sentitems/messages", {
            "$filter": f"internetMessageId eq '{mid}'", "$select": "id,subject"})
        in_sent = bool(sent_items.get("value"))
        ok = (msg.get("from", "").lower() == alice.address and token and token in str(msg.get("subject", ""))
              and in_sent)
        return Outcome(bool(ok), f"CRM Sent; outbox: from {msg.get('from')}, '{msg.get('subject')}'; "
                                 f"{'in' if in_sent else 'NOT in'} alice's Sent Items"), row

    async def outbound_o1(org: Org, ctx: dict[str, Any]) -> Outcome:
        return (await outbound(org, ctx, "o1"))[0]

    async def outbound_o2(org: Org, ctx: dict[str, Any]) -> Outcome:
        return (await outbound(org, ctx, "o2"))[0]

    def reply(key: str, sent_key: str, *, regarding: str, parent: bool) -> Callable[[Org, dict[str, Any]],
                                                                                      Awaitable[Outcome]]:
        async def check(org: Org, ctx: dict[str, Any]) -> Outcome:
            mail = mails.get(key)
            if mail is None or not mail.message_id:
                return Outcome(False, "reply not sent: the outbound email never reached the outbox")
            row, why = await one_email(org, key)
            if row is None:
                return Outcome(False, why + await _decision_hint(org, mail.message_id))
            sent = ctx.setdefault("sent", {}).get(sent_key) or {}
            got_regarding = _name(row, "_regardingobjectid_value")
            got_parent = str(row.get("_parentactivityid_value") or "")
            ok = (got_regarding == regarding and _name(row, "_ownerid_value") == alice.name
                  and (got_parent == sent.get("activityid") if parent else True))
            parent_text = "parent = the sent email" if got_parent and got_parent == sent.get("activityid") else \
                f"parent {got_parent or '-'}"
            return Outcome(ok, f"tracked for {_name(row, '_ownerid_value')}, regarding {got_regarding}, {parent_text}")

        return check

    async def queue_item(org: Org, ctx: dict[str, Any]) -> Outcome:
        # Queue mail lands in its queue as a queue item (CreateQueueItemForSynchronizingMailbox, issue 13), once.
        row, why = await one_email(org, "queue-attachment")
        if row is None:
            return Outcome(False, why)
        items = (await org.dv_get("queueitems", {"$filter": f"_objectid_value eq {row['activityid']}",
                                                 "$select": "queueitemid,_queueid_value"})).get("value", [])
        queues = [str(i.get("_queueid_value")) for i in items]
        return Outcome(queues == [QUEUE.record_id], f"{len(items)} queue item(s), in "
                       f"{', '.join('Support' if q == QUEUE.record_id else q for q in queues) or 'no queue'}")

    async def filter_change(org: Org, ctx: dict[str, Any]) -> Outcome:
        """An admin changes erin's filter to "all" and applies it to mail already skipped, with the product's own
        services (what `emailrouter mailbox set erin --filter all` and `emailrouter reprocess erin --from kim` do);
        the host decides the message again. Runs last (final_only): the other scenarios have settled."""
        from datetime import UTC, datetime, timedelta

        from core.bootstrap import Container
        from core.cli.config import stack_values
        from core.config import Settings
        from core.services.reprocess import reprocess

        mail, state = mails["filter-change"], ctx.setdefault("filter-change", {})

        async def admin(step: Callable[[Any], Awaitable[Any]]) -> Any:
            container = Container(Settings(stack_values(org.stack)))
            try:
                return await step(container)
            finally:
                await container.storage.close()

        if "first" not in state:
            decisions = await org.decisions_for(mail.message_id)
            if not decisions:
                return Outcome(False, "no decision recorded yet")
            state["first"] = "; ".join(sorted({str(d.get("outcome")) for d in decisions}))
            if not state["first"].startswith("skipped"):
                return Outcome(False, f"expected a skip first, got {state['first']}")

            async def change_and_reprocess(container: Any) -> int:
                await container.mailbox_directory.set_overrides(erin.address, {"Filter": "all"})
                since = datetime.now(UTC) - timedelta(hours=1)
                return (await reprocess(container, erin.address, since, sender=PROSPECT)).enqueued

            state["queued"] = await admin(change_and_reprocess)
        if not state["first"].startswith("skipped"):
            return Outcome(False, f"expected a skip first, got {state['first']}")
        rows = await org.emails_by_message_id(mail.message_id)
        if len(rows) == 1 and not state.get("restored"):
            # Erin's filter goes back to CRM's value once the message is decided (what `--filter ""` does).
            await admin(lambda c: c.mailbox_directory.set_overrides(erin.address, {"Filter": ""}))
            state["restored"] = True
        observed = (f"first {state['first']}; filter set to all, reprocess queued {state['queued']}; "
                    f"{len(rows)} CRM email(s)")
        return Outcome(len(rows) == 1 and state["queued"] == 1, observed)

    async def by_category(org: Org, ctx: dict[str, Any]) -> Outcome:
        row, why = await one_email(org, "category")
        steps = ctx.get("category", {})
        if row is None:
            return Outcome(False, f"{steps.get('done', 'not categorised yet')}; {why}"
                           + await _decision_hint(org, mails["category"].message_id))
        decisions = await org.decisions_for(mails["category"].message_id)
        via = sorted({str(d.get("source", "?")) for d in decisions})
        owner = _name(row, "_ownerid_value")
        return Outcome(owner == erin.name and via == ["category"],
                       f"first {steps.get('first', '?')}; {steps.get('done', '')}; then 1 email, owner {owner}, "
                       f"decided from a {'/'.join(via)} request")

    return [
        Scenario("settings", "CRM sync: delivery methods -> settings", "a row per mailbox, methods and filters "
                 "as in CRM; bob forwards to crm-sink", settings),
        Scenario("subscriptions", "Subscriptions follow the methods", "alice, erin, frank, grace, support, "
                 "crm-sink watched; not bob, carol, dave", subscriptions),
        Scenario("individual", "Individual mailbox (erin, filter 2)", f"contact -> erin: tracked, owner "
                 f"{erin.name}", tracked("individual", owner=erin.name, sender="contact Nora North")),
        Scenario("filter2-stranger", "Filter 2 leads/contacts/accounts", "unknown sender -> erin: not tracked",
                 not_tracked("filter2-stranger", reason_words=("filter", "nocorrelationmatch", "not_accepted"))),
        Scenario("filter3", "Filter 3 email-enabled records (frank)", "colleague carol -> frank: tracked",
                 tracked("filter3", owner=frank.name, sender="systemuser Carol Clark")),
        Scenario("filter4", "Filter 4 no email messages (grace)", "contact -> grace: not tracked",
                 not_tracked("filter4", reason_words=("filter", "nocorrelationmatch", "not_accepted"))),
        Scenario("filter1-new", "Filter 1 replies to CRM email (alice)", "a new (non-reply) mail: not tracked",
                 not_tracked("filter1-new", reason_words=("filter", "nocorrelationmatch", "not_accepted"))),
        Scenario("queue-attachment", "Queue mailbox, filter 0, attachment", f"stranger -> support: tracked, "
                 f"owner {person(QUEUE_OWNER).name} (queue owner), invoice.pdf attached", queue_attachment),
        Scenario("queue-item", "Queue mail is a queue item", "the support mail: one queue item in the Support "
                 "queue (queue views, case-creation rules see it)", queue_item),
        Scenario("two-users", "Same mail to two users", "lead -> erin + frank: ONE CRM email, both in To",
                 two_users),
        Scenario("auto-reply", "Automatic reply", "Auto-Submitted: auto-replied -> support: skipped",
                 not_tracked("auto-reply", reason_words=("auto",))),
        Scenario("forward", "Forward mailbox (bob -> crm-sink)", f"unwrapped; tracked once, owner {bob.name}, "
                 f"from {gus.name}", forward),
        Scenario("o1", "Outbound: alice sends from CRM", "Pending Send -> Sent; outbox from alice with the "
                 "token; copy in Sent Items", outbound_o1),
        Scenario("reply-inreplyto", "Reply correlated by In-Reply-To", f"Fiona's reply: tracked for alice, "
                 f"regarding {OPPORTUNITY.name}, parent = sent email",
                 reply("reply-inreplyto", "o1", regarding=OPPORTUNITY.name, parent=True)),
        Scenario("o2", "Outbound: alice to Gus about the case", "Sent; outbox from alice with the token",
                 outbound_o2),
        Scenario("reply-token", "Reply correlated by tracking token", f"Gus's mail with only the token: "
                 f"tracked, regarding {CASE.name}", reply("reply-token", "o2", regarding=CASE.name, parent=False)),
        Scenario("category", "Track by category (erin, TrackCategorizedItems)", "a mail her filter skipped, moved "
                 f"to a folder and given '{TRACK_CATEGORY}' in Outlook: tracked once, owner {erin.name}", by_category),
        Scenario("outlook", "Outlook-client user (carol)", "mail to carol: no CRM email (Outlook tracks)",
                 untouched("outlook"), final_only=True),
        Scenario("none", "User with None (dave)", "mail to dave: no CRM email", untouched("none"), final_only=True),
        Scenario("filter-change", "Apply a filter change to past mail", "prospect -> erin: skipped (filter 2); "
                 "filter set to all + `reprocess`: tracked, ONE CRM email", filter_change, final_only=True),
    ]


async def _decision_hint(org: Org, message_id: str) -> str:
    decisions = await org.decisions_for(message_id)
    if not decisions:
        return ""
    return "; decision " + ", ".join(f"{d.get('mailbox')}: {d.get('outcome')}" for d in decisions)


# ================================================================================================ the run


@dataclass
class DemoResult:
    scenarios: list[Scenario]
    error: str = ""
    log_dir: Path | None = None  # the services' logs
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.error and all(s.outcome.passed for s in self.scenarios)


def _timers(functions: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Which timer function does what, by name (the host lists names, not purposes)."""
    out: dict[str, str] = {}
    for f in functions:
        if str(f.get("trigger")) != "timerTrigger":
            continue
        name = str(f["name"])
        low = name.lower()
        if "reconcile" in low or "subscription" in low:
            out.setdefault("reconcile", name)
        elif "delta" in low or "catchup" in low:
            out.setdefault("delta", name)
        elif "outbound" in low or "pending" in low or "send" in low:
            out.setdefault("outbound", name)
        elif "crm" in low or "sync" in low or "setting" in low:
            out.setdefault("crm_sync", name)
    return out


async def _send_from_crm(org: Org, *, to: demo_org.CrmRecord, regarding: demo_org.CrmRecord, subject: str,
                         html: str) -> dict[str, Any]:
    """What the CRM UI does: create the email as the user, then SendEmail (IssueSend) -> Pending Send."""
    alice = person("alice")
    activity_id = str(uuid.uuid4())
    await org.dv_post("emails", {
        "activityid": activity_id, "subject": subject, "description": html, "directioncode": True,
        f"regardingobjectid_{regarding.table}_email@odata.bind": f"/{regarding.entity_set}({regarding.id})",
        "email_activity_parties": [
            {"participationtypemask": 1, "partyid_systemuser@odata.bind": f"/systemusers({alice.systemuser_id})"},
            {"participationtypemask": 2, f"partyid_{to.table}@odata.bind": f"/{to.entity_set}({to.id})"},
        ],
    }, as_user=alice.object_id)
    resp = await org.dv_post(f"emails({activity_id})/Microsoft.Dynamics.CRM.SendEmail",
                             {"IssueSend": True, "TrackingToken": ""}, as_user=alice.object_id)
    row = await org.email(activity_id)
    return {"activityid": activity_id, "subject": resp.json().get("Subject"),
            "token": row.get("trackingtoken"), "status": _name(row, "statuscode")}


async def _switch_on_track_by_category(org: Org) -> None:
    """The admin's step (OrgSettings, as `emailrouter settings set` writes it): track by category on, every
    delta catch-up may search (TrackCategoryIntervalMinutes 1, so the demo needs no 5-minute wait)."""
    from core.names import MAILBOXES_TABLE, ORG_SETTINGS_TABLE
    from core.settings.store import TableMailboxDirectory

    settings = TableMailboxDirectory(org.table(MAILBOXES_TABLE), org.table(ORG_SETTINGS_TABLE))
    await settings.set_org_value("TrackCategorizedItems", "true")
    await settings.set_org_value("TrackCategoryIntervalMinutes", "1")


async def _track_by_category(org: Org, mail: InboundMail, scenario: Scenario, ctx: dict[str, Any],
                             run_timer: Callable[[str], Awaitable[None]], deadline: float,
                             say: Callable[[str], None]) -> None:
    """Erin's step, once the router skipped the mail (her filter: leads, contacts, accounts only): in Outlook she
    moves it to a folder of her own and gives it the category (here the same Graph calls Outlook makes). The router
    finds it at the next delta catch-up (the timer, run now) and tracks it."""
    state: dict[str, Any] = ctx.setdefault("category", {})
    erin = person("erin").address
    until = min(deadline, time.monotonic() + 45)
    while time.monotonic() < until:
        decisions = await org.decisions_for(mail.message_id)
        if decisions:
            state["first"] = "; ".join(sorted({str(d.get("outcome")) for d in decisions}))
            break
        await asyncio.sleep(_POLL_S)
    if not str(state.get("first", "")).startswith("skipped"):
        scenario.outcome = Outcome(False, f"expected the filter to skip it first, got {state.get('first', 'nothing')}")
        return
    headers = {"Authorization": f"Bearer {await org.token('https://graph.microsoft.com/.default')}",
               "Prefer": 'IdType="ImmutableId"'}
    core = mail.message_id.strip("<>").replace("'", "''")
    found = await org.graph_get(f"users/{erin}/messages", {"$filter": f"internetMessageId eq '<{core}>'",
                                                            "$select": "id"})
    folder = await org.http.post(f"{org.graph}/users/{erin}/mailFolders", json={"displayName": "Trade fair"},
                                 headers=headers)
    moved = await org.http.post(f"{org.graph}/users/{erin}/messages/{found['value'][0]['id']}/move",
                                json={"destinationId": folder.json()["id"]}, headers=headers)
    tagged = await org.http.patch(f"{org.graph}/users/{erin}/messages/{moved.json()['id']}",
                                  json={"categories": [TRACK_CATEGORY]}, headers=headers)
    tagged.raise_for_status()
    state["done"] = f"moved to 'Trade fair' and given '{TRACK_CATEGORY}'"
    say(f"erin gave the skipped mail the category '{TRACK_CATEGORY}' in a folder of her own")
    last = 0.0

    async def catch_up() -> None:
        nonlocal last
        if time.monotonic() - last > 5:
            last = time.monotonic()
            await run_timer("delta")

    await _poll([scenario], org, ctx, [scenario.key], min(deadline, time.monotonic() + 60), catch_up)


async def _poll(scenarios: Sequence[Scenario], org: Org, ctx: dict[str, Any], keys: Iterable[str],
                deadline: float, tick: Callable[[], Awaitable[None]] | None = None) -> bool:
    """Evaluate the named scenarios until all pass or the deadline; True if all passed."""
    wanted = [s for s in scenarios if s.key in set(keys)]
    while True:
        for s in wanted:
            if not s.outcome.passed:
                try:
                    s.outcome = await s.check(org, ctx)
                except (httpx.HTTPError, OSError) as exc:
                    s.outcome = Outcome(False, f"could not check: {type(exc).__name__}: {exc}"[:300])
        if all(s.outcome.passed for s in wanted) or time.monotonic() >= deadline:
            return all(s.outcome.passed for s in wanted)
        if tick is not None:
            await tick()
        await asyncio.sleep(_POLL_S)


async def run_scenario(stack: Mapping[str, Any], deadline: float, say: Callable[[str], None]) -> list[Scenario]:
    org = Org(stack)
    mails = {m.key: m for m in _inbound_mails()}
    scenarios = build_scenarios(mails)
    by_key = {s.key: s for s in scenarios}
    ctx: dict[str, Any] = {}
    try:
        timers = _timers(await org.functions())
        ctx["timers"] = timers
        say(f"router timers found: {', '.join(f'{k}={v}' for k, v in sorted(timers.items())) or 'none'}")

        async def run_timer(purpose: str) -> None:
            name = timers.get(purpose)
            if name is not None:
                with contextlib.suppress(httpx.HTTPError):
                    await org.run_function(name)

        await _switch_on_track_by_category(org)
        # 1. settings from CRM, then subscriptions (production does both on timers)
        say("running the CRM sync")
        await run_timer("crm_sync")
        last = time.monotonic()

        async def resync() -> None:
            nonlocal last
            if time.monotonic() - last > 5:
                last = time.monotonic()
                await run_timer("crm_sync")

        await _poll(scenarios, org, ctx, ["settings"], min(deadline, time.monotonic() + 30), resync)
        if "crm_sync" not in timers:
            by_key["settings"].outcome.observed += " (no CRM sync timer registered in function_app.py)"
        say("reconciling subscriptions")
        await run_timer("reconcile")

        async def reconcile() -> None:
            nonlocal last
            if time.monotonic() - last > 5:
                last = time.monotonic()
                await run_timer("reconcile")

        # The host reads the settings table through a cache (an edited row takes effect within a minute), so
        # the reconcile may first see no mailboxes: it is retried until the cache has caught up.
        await _poll(scenarios, org, ctx, ["subscriptions"], min(deadline, time.monotonic() + 75), reconcile)
        if "reconcile" not in timers:
            by_key["subscriptions"].outcome.observed += " (no reconcile timer registered in function_app.py)"

        # 2. mail from outside, over SMTP
        say(f"sending {len(mails)} mails over SMTP to {org.smtp[0]}:{org.smtp[1]}")
        for mail in mails.values():
            mail.message_id = _mid(mail.key)
            msg = build_message(sender=mail.sender, sender_name=mail.sender_name, to=mail.to, subject=mail.subject,
                                body=mail.body, message_id=mail.message_id, headers=mail.headers,
                                attachments=mail.attachments)
            await asyncio.to_thread(send_mail, org.smtp, msg)

        # 3. from CRM: alice writes to Fiona about the opportunity and to Gus about the case
        fiona, gus, _ = CONTACTS
        state: dict[str, Any] = ctx.setdefault("sent", {})
        for key, to, regarding, subject in (("o1", fiona, OPPORTUNITY, "Rollout plan"),
                                             ("o2", gus, CASE, "Case update")):
            try:
                state[key] = await _send_from_crm(org, to=to, regarding=regarding, subject=subject,
                                                  html=f"<p>Hello {to.name.split()[0]},</p><p>{subject}.</p>")
                say(f"CRM SendEmail {key}: '{state[key]['subject']}' -> {state[key]['status']}")
            except httpx.HTTPError as exc:
                by_key[key].outcome = Outcome(False, f"CRM SendEmail failed: {exc}")
        await run_timer("outbound")

        async def scan() -> None:
            nonlocal last
            if time.monotonic() - last > 3:
                last = time.monotonic()
                await run_timer("outbound")

        # 4. the external replies, once the outbound mails left (the loop closes)
        await _poll(scenarios, org, ctx, ["o1", "o2"], min(deadline, time.monotonic() + 60), scan)
        if "o1" in state and by_key["o1"].outcome.passed:
            reply = InboundMail("reply-inreplyto", fiona.email, (person("alice").address,), "Re: Rollout plan",
                                "Thanks Alice, looks good.", "Fiona Fabrikam", message_id=_mid("reply-irt"))
            msg = build_message(sender=reply.sender, sender_name=reply.sender_name, to=reply.to,
                                subject=reply.subject, body=reply.body, message_id=reply.message_id,
                                in_reply_to=str(ctx.get("sent_message_ids", {}).get("o1") or ""))
            await asyncio.to_thread(send_mail, org.smtp, msg)
            mails[reply.key] = reply
        if "o2" in state and by_key["o2"].outcome.passed:
            token = str(state["o2"].get("token") or "")
            reply = InboundMail("reply-token", gus.email, (person("alice").address,), f"Re: Case update {token}",
                                "Still not arriving, see screenshot.", "Gus Gray", message_id=_mid("reply-token"))
            msg = build_message(sender=reply.sender, sender_name=reply.sender_name, to=reply.to,
                                subject=reply.subject, body=reply.body, message_id=reply.message_id)
            await asyncio.to_thread(send_mail, org.smtp, msg)
            mails[reply.key] = reply

        await _track_by_category(org, mails["category"], by_key["category"], ctx, run_timer, deadline, say)
        # 5. everything else, then the negatives that need the rest to have settled
        say("waiting for the router")
        positives = [s.key for s in scenarios if not s.final_only]
        await _poll(scenarios, org, ctx, positives, deadline)
        ctx["settled"] = by_key["individual"].outcome.passed and by_key["queue-attachment"].outcome.passed
        await _poll(scenarios, org, ctx, [s.key for s in scenarios if s.final_only], deadline)
    finally:
        await org.close()
    return scenarios


def run_demo(*, timeout: float = 170.0, keep: bool = False, log_dir: Path | None = None,
             say: Callable[[str], None] = lambda line: None,
             inspect: Callable[[Mapping[str, Any]], None] | None = None) -> DemoResult:
    """Start a fresh stack, run the scenario, stop everything. Never raises for scenario failures.

    ``inspect(stack_json)`` runs after the scenario while the stack is still up (the e2e test looks at the live
    view's snapshot there)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    state_dir = Path(tempfile.mkdtemp(prefix="emailrouter-demo-"))
    log_dir = log_dir or ROOT / ".local" / "demo" / "logs"
    for old in log_dir.glob("*.log"):  # the driver appends: this run's logs only
        old.unlink()
    stack = Stack(state_dir, seed="demo", fresh=True, log_dir=log_dir, say=lambda line: None)
    scenarios = build_scenarios({m.key: m for m in _inbound_mails()})
    error = ""
    try:
        say(f"starting a fresh stack in {state_dir} (logs: {log_dir})")
        stack.start(within=max(1.0, min(deadline, t0 + 120) - time.monotonic()))
        say(f"stack up after {time.monotonic() - t0:.0f}s")
        scenarios = asyncio.run(run_scenario(stack.doc, deadline, say))
        if inspect is not None:
            inspect(stack.doc)
    except (StackError, OSError, httpx.HTTPError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        say("stopping the stack")
        stack.stop()
        if not keep:
            shutil.rmtree(state_dir, ignore_errors=True)
    return DemoResult(scenarios, error=error, log_dir=log_dir, elapsed_s=time.monotonic() - t0)


def render(result: DemoResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Email Router demo - Contoso", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("scenario")
    table.add_column("expected")
    table.add_column("observed")
    table.add_column("result")
    for i, s in enumerate(result.scenarios, 1):
        table.add_row(str(i), s.title, s.expected, s.outcome.observed,
                      "[green]PASS[/green]" if s.outcome.passed else "[red]FAIL[/red]")
    console.print(table)
    passed = sum(s.outcome.passed for s in result.scenarios)
    if result.error:
        console.print(f"[red]demo error:[/red] {result.error}")
    colour = "green" if result.passed else "red"
    console.print(f"[{colour}]{passed}/{len(result.scenarios)} scenarios passed[/{colour}] in "
                  f"{result.elapsed_s:.0f}s" + (f"; service logs: {result.log_dir}" if result.log_dir else ""))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m local.demo", description="Run the scripted demo scenario")
    p.add_argument("--timeout", type=float, default=170.0, help="overall deadline in seconds (default 170)")
    p.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    p.add_argument("--logs", type=Path, help="folder for the services' logs (default .local/demo/logs)")
    p.add_argument("--against", type=Path, metavar="STATE_DIR",
                   help="run the scenario against an already running stack (e.g. .local from `make run`) instead "
                        "of a fresh one; it adds demo mail and CRM emails to that org")
    args = p.parse_args(argv)
    from rich.console import Console

    console = Console()

    def say(line: str) -> None:
        console.print(f"[dim]demo:[/dim] {line}")

    if args.against is not None:
        t0 = time.monotonic()
        try:
            attached = Stack.attach(args.against)
        except StackError as exc:
            console.print(f"[red]{exc}[/red]")
            return 2
        scenarios = asyncio.run(run_scenario(attached.doc, t0 + args.timeout, say))
        result = DemoResult(scenarios, log_dir=None, elapsed_s=time.monotonic() - t0)
    else:
        result = run_demo(timeout=args.timeout, keep=args.keep, log_dir=args.logs, say=say)
    render(result)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
