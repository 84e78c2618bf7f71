"""``emailrouter doctor``: what an admin runs against a real org after deploying (issue 13 item 5).

Read-only by default. It asks the org what the router would otherwise assume:

* **metadata** (``EntityDefinitions``, the same read the pipelines cache: ``core.services.org_schema``): the entity
  set of every table the router uses, the navigation property the org declares for every bind the router makes
  (``core.domain.org_schema.BINDS``), and whether optimistic concurrency is on for email (the outbound claim is an
  If-Match PATCH; without it the router does not send);
* **the application user**: ``WhoAmI``, its ``systemuser`` row, and its privileges
  (``RetrieveUserPrivileges``, bound to the user: the app user may call it on itself with read access to users)
  against :data:`REQUIRED_PRIVILEGES`;
* **Server-Side Synchronization** also active on a mailbox for a direction the router serves (an email server
  profile, enabled, Test & Enable passed: both would send, or both would track);
* **app settings** that are still Key Vault / App Configuration references (the host could not resolve them).

``--sandbox`` also writes, then deletes: a throw-away email and the records that exercise each bind the router
makes (owner, receiving mailbox, parent and correlated activity, regarding, activity parties, an attachment, a
queue item), the outbound state path (Pending Send -> Sending with If-Match, a stale ETag refused, Sending -> Sent
by a status change, whether the platform stamps Date Sent), and, in a router mailbox, a Graph draft with a chosen
Message-ID (does Exchange keep it?).

Output: a pass/fail table (rich) or ``--json``; exit 1 when any check fails.
"""

from __future__ import annotations

import argparse
import base64
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from .registry import command

__all__ = ["REQUIRED_PRIVILEGES", "Check", "DoctorReport", "Outcome", "doctor", "metadata_checks",
           "privilege_checks", "run_doctor", "settings_checks", "sss_checks"]

SANDBOX_SUBJECT: Final = "Email Router doctor sandbox (deleted automatically)"

# Tables the router cannot work without (their entity set must be declared); the others are regarding targets.
_REQUIRED_TABLES: Final = frozenset({"email", "activityparty", "activitymimeattachment", "contact", "account", "lead",
                                     "systemuser", "queue", "mailbox", "organization", "usersettings", "queueitem",
                                     "team"})
_TABLES: Final = (*sorted(_REQUIRED_TABLES), "opportunity", "incident")  # whose entity set the doctor shows
# Binds the router leaves out on purpose when the org declares one name for several targets (see OrgSchema.nav).
_OPTIONAL_BINDS: Final = frozenset({("email", "acceptingentityid")})

_DEPTHS: Final = {"basic": 0, "local": 1, "deep": 2, "global": 3}


@dataclass(frozen=True)
class Requirement:
    privilege: str
    depth: str  # the least depth that works (Basic / Local / Deep / Global)
    why: str
    optional: bool = False  # missing = a feature is off (warning), not a broken router


# What the router does, as Dataverse privileges. Email is an activity: its privileges are the Activity ones;
# attachments and queue items have no owner (OwnershipType None) and follow their email / queue.
REQUIRED_PRIVILEGES: Final[tuple[Requirement, ...]] = (
    Requirement("prvCreateActivity", "Basic", "create tracked emails, attachments"),
    Requirement("prvReadActivity", "Global", "correlation lookups and the outbound scan read every user's email"),
    Requirement("prvWriteActivity", "Global", "set the state of tracked email; outbound Pending Send -> Sent"),
    Requirement("prvAppendActivity", "Global", "attachments, parties and queue items appended to an email"),
    Requirement("prvAppendToActivity", "Global", "replies bound to their parent / correlated email"),
    Requirement("prvAssignActivity", "Global", "tracked email owned by the mailbox's user"),
    Requirement("prvReadContact", "Global", "resolve senders and recipients"),
    Requirement("prvReadAccount", "Global", "resolve senders and recipients"),
    Requirement("prvReadLead", "Global", "resolve senders and recipients"),
    Requirement("prvReadUser", "Global", "resolve internal addresses; the CRM sync; this check"),
    Requirement("prvAppendToContact", "Global", "contacts set as parties of an email"),
    Requirement("prvAppendToAccount", "Global", "accounts set as parties of an email"),
    Requirement("prvAppendToLead", "Global", "leads set as parties of an email"),
    Requirement("prvReadQueue", "Global", "resolve queue addresses; the CRM sync"),
    Requirement("prvReadTeam", "Global", "the CRM sync leaves teams' default queues out"),
    Requirement("prvAppendToQueue", "Global", "queue items for queue mail (AddToQueue / queueitem create)"),
    Requirement("prvReadMailbox", "Global", "the CRM sync reads delivery methods and SSS state"),
    Requirement("prvWriteMailbox", "Global", "mailbox health written back to CRM"),
    Requirement("prvReadOrganization", "Global", "organization email settings"),
    Requirement("prvReadUserSettings", "Global", "tracking filter per user"),
    Requirement("prvCreateContact", "Global", "AutoCreateContacts for unknown senders", optional=True),
)


class Outcome(StrEnum):
    PASS = "pass"  # noqa: S105 - an outcome, not a password
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    area: str
    name: str
    outcome: Outcome
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"area": self.area, "check": self.name, "outcome": self.outcome.value, "detail": self.detail}


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.outcome is Outcome.FAIL]

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, area: str, name: str, outcome: Outcome, detail: str) -> Check:
        check = Check(area, name, outcome, detail)
        self.checks.append(check)
        return check

    def extend(self, checks: Iterable[Check]) -> None:
        self.checks.extend(checks)

    def to_json(self) -> dict[str, Any]:
        counts = {o.value: sum(1 for c in self.checks if c.outcome is o) for o in Outcome}
        return {"ok": self.ok, "counts": counts, "checks": [c.to_json() for c in self.checks]}


# ------------------------------------------------------------------------------------------------ pure checks


def metadata_checks(schema: Any) -> list[Check]:
    """``OrgSchema`` read from the org -> checks: entity sets, every bind's navigation property, concurrency."""
    from core.domain.org_schema import BINDS, DOCUMENTED

    checks: list[Check] = []
    missing_sets = [t for t in _TABLES if not schema.entity_set(t)]
    found = {t: schema.entity_set(t) for t in _TABLES if schema.entity_set(t)}
    required_missing = [t for t in missing_sets if t in _REQUIRED_TABLES]
    if required_missing:
        checks.append(Check("metadata", "entity sets", Outcome.FAIL,
                            f"no entity set declared for: {', '.join(required_missing)}"))
    else:
        extra = f"; not in this org: {', '.join(missing_sets)}" if missing_sets else ""
        checks.append(Check("metadata", "entity sets", Outcome.PASS,
                            ", ".join(f"{t}={s}" for t, s in sorted(found.items())) + extra))
    for bind in BINDS:
        nav = schema.nav(bind.entity, bind.attribute, bind.target)
        name = f"bind {bind.entity}.{bind.attribute} -> {bind.target}"
        documented = DOCUMENTED.nav(bind.entity, bind.attribute, bind.target)
        if nav and documented and nav != documented:
            checks.append(Check("metadata", name, Outcome.WARN,
                                f"renamed in this org: {nav}@odata.bind (documented: {documented}); the router binds "
                                f"the org's name ({bind.purpose})"))
        elif nav:
            checks.append(Check("metadata", name, Outcome.PASS, f"{nav}@odata.bind ({bind.purpose})"))
        elif (bind.entity, bind.attribute) in _OPTIONAL_BINDS:
            checks.append(Check("metadata", name, Outcome.WARN,
                                f"not bound: the org declares no navigation property for it alone ({bind.purpose}; "
                                "left out on purpose, the email is tracked without it)"))
        else:
            checks.append(Check("metadata", name, Outcome.FAIL,
                                f"the org declares no navigation property for {bind.entity}.{bind.attribute} -> "
                                f"{bind.target} ({bind.purpose}): the router cannot bind it"))
    enabled = schema.concurrency_enabled("email")
    if enabled is True:
        checks.append(Check("metadata", "optimistic concurrency on email", Outcome.PASS,
                            "IsOptimisticConcurrencyEnabled = true: the outbound claim (If-Match) works"))
    elif enabled is False:
        checks.append(Check("metadata", "optimistic concurrency on email", Outcome.FAIL,
                            "IsOptimisticConcurrencyEnabled = false: an If-Match PATCH fails with 0x8006088d, so "
                            "outbound does not run (nothing is sent) until it is on"))
    else:
        checks.append(Check("metadata", "optimistic concurrency on email", Outcome.WARN,
                            "the org did not report IsOptimisticConcurrencyEnabled for email"))
    return checks


def privilege_checks(role_privileges: Sequence[Mapping[str, Any]],
                     required: Sequence[Requirement] = REQUIRED_PRIVILEGES) -> list[Check]:
    """RolePrivilege objects (RetrieveUserPrivileges) -> one check per required privilege."""
    held: dict[str, int] = {}
    for p in role_privileges:
        name = str(p.get("PrivilegeName") or "")
        depth = _DEPTHS.get(str(p.get("Depth") or "").lower(), -1)
        if name:
            held[name.lower()] = max(held.get(name.lower(), -1), depth)
    checks: list[Check] = []
    for req in required:
        have = held.get(req.privilege.lower())
        need = _DEPTHS[req.depth.lower()]
        label = next((k for k, v in _DEPTHS.items() if v == have), "?") if have is not None else ""
        if have is not None and have >= need:
            checks.append(Check("privileges", req.privilege, Outcome.PASS, f"{label.capitalize()} ({req.why})"))
            continue
        bad = Outcome.WARN if req.optional else Outcome.FAIL
        if have is None:
            detail = f"not held; needed at {req.depth} depth to {req.why}"
        else:
            detail = f"held at {label.capitalize()} depth, {req.depth} needed to {req.why}"
        checks.append(Check("privileges", req.privilege, bad, detail))
    return checks


def sss_checks(found: Sequence[Any]) -> list[Check]:
    """``crm_sync.crm_mailboxes`` output -> Server-Side Sync findings per mailbox and direction."""
    checks: list[Check] = []
    for mbx in found:
        for direction, column, serves in (
                ("outgoing", "CrmSssOutgoing", mbx.columns.get("CrmOutbound") == "router"),
                ("incoming", "CrmSssIncoming", mbx.columns.get("CrmInbound") in ("individual", "forward"))):
            state = mbx.columns.get(column)
            if state not in ("active", "configured") or not serves:
                continue
            if state == "active":
                effect = ("SSS sends its email too: the router leaves it to SSS" if direction == "outgoing" else
                          "SSS tracks its mail too: duplicate CRM emails")
                checks.append(Check("server-side sync", f"{mbx.address} {direction}", Outcome.FAIL,
                                    f"email server profile set, enabled and tested: {effect}. Remove the profile, "
                                    "or let SSS serve this mailbox alone"))
            else:
                checks.append(Check("server-side sync", f"{mbx.address} {direction}", Outcome.WARN,
                                    "an email server profile is set: a Test & Enable in CRM would start SSS for this "
                                    "direction too"))
    if not checks:
        checks.append(Check("server-side sync", "router mailboxes", Outcome.PASS,
                            f"{len(found)} mailbox(es): none has Server-Side Synchronization set up for a direction "
                            "the router serves"))
    return checks


def settings_checks(values: Mapping[str, str] | None) -> list[Check]:
    """App settings still holding a Key Vault / App Configuration reference (the host did not resolve them)."""
    if values is None:
        return [Check("app settings", "Key Vault references", Outcome.SKIP, "the settings in use are not visible")]
    try:
        from core import config

        finder = getattr(config, "unresolved_settings", None)
        names = list(finder(values)) if callable(finder) else sorted(
            n for n, v in values.items()
            if str(v).strip().lower().startswith(("@microsoft.keyvault(", "@microsoft.appconfiguration(")))
    except Exception as exc:  # an unexpected settings shape: report it instead of crashing the doctor
        return [Check("app settings", "Key Vault references", Outcome.WARN, f"not checked ({type(exc).__name__})")]
    if names:
        return [Check("app settings", "Key Vault references", Outcome.FAIL,
                      f"not resolved (the value is still the reference text): {', '.join(names)}; check the app's "
                      "managed identity access to the vault and the reference syntax")]
    return [Check("app settings", "Key Vault references", Outcome.PASS, "none unresolved")]


# ------------------------------------------------------------------------------------------------ the run


async def _guard(report: DoctorReport, area: str, name: str, step: Callable[[], Awaitable[str]],
                 *, fail: Outcome = Outcome.FAIL) -> bool:
    """Run one check step; its return value is the PASS detail, an exception becomes the check's failure."""
    try:
        detail = await step()
    except Exception as exc:
        report.add(area, name, fail, _describe(exc))
        return False
    report.add(area, name, Outcome.PASS, detail)
    return True


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", "")
    message = str(getattr(exc, "message", "") or exc)
    if status is not None:
        return f"Dataverse {status} {code} {message[:300]}".replace("  ", " ").strip()
    return f"{type(exc).__name__}: {message[:300]}"


async def run_doctor(client: Any, *, sandbox: bool = False, settings: Mapping[str, str] | None = None,
                     graph: Any = None, mailbox: str | None = None) -> DoctorReport:
    """All checks against ``client`` (a :class:`core.adapters.dataverse.DataverseClient`)."""
    from core.services.org_schema import read_org_schema

    report = DoctorReport()
    report.extend(settings_checks(settings))
    schema = None
    try:
        schema = await read_org_schema(client)
    except Exception as exc:
        report.add("metadata", "EntityDefinitions", Outcome.FAIL, f"cannot read the org's metadata: {_describe(exc)}")
    if schema is not None:
        report.extend(metadata_checks(schema))

    me: dict[str, Any] = {}

    async def whoami() -> str:
        me.update(await client.whoami())
        row = await client.get("systemusers", me["UserId"], select=["fullname", "applicationid", "isdisabled",
                                                                      "accessmode"])
        me["row"] = row
        kind = "application user" if row.get("applicationid") else "user (not an application user)"
        state = "disabled" if row.get("isdisabled") else "enabled"
        return f"{row.get('fullname') or me['UserId']} ({kind}, {state}), id {me['UserId']}"

    if await _guard(report, "app user", "WhoAmI", whoami):
        if (me.get("row") or {}).get("isdisabled"):
            report.add("app user", "enabled", Outcome.FAIL, "the application user is disabled")
        try:
            report.extend(privilege_checks(await client.retrieve_user_privileges(me["UserId"])))
        except Exception as exc:
            report.add("privileges", "RetrieveUserPrivileges", Outcome.WARN,
                       f"could not read the app user's own privileges ({_describe(exc)}); grant prvReadUser")

    try:
        report.extend(sss_checks(await _crm_mailboxes(client)))
    except Exception as exc:
        report.add("server-side sync", "mailboxes", Outcome.FAIL, f"cannot read mailboxes: {_describe(exc)}")

    if sandbox:
        await _sandbox(report, client, schema, me.get("UserId"))
        if graph is not None and mailbox:
            await _graph_sandbox(report, graph, mailbox)
        else:
            report.add("sandbox", "Graph: chosen Message-ID kept", Outcome.SKIP,
                       "no router-outbound mailbox to try a draft in (--mailbox ADDRESS)")
    return report


async def _crm_mailboxes(client: Any) -> list[Any]:
    from core.settings.crm_sync import (
        MAILBOX_SELECT,
        QUEUE_SELECT,
        TEAM_SELECT,
        USER_SELECT,
        crm_mailboxes,
    )

    async def rows(entity_set: str, select: Sequence[str]) -> list[dict[str, Any]]:
        return [r async for r in client.list(entity_set, select=select, page_size=500)]

    found, _errors = crm_mailboxes(await rows("systemusers", USER_SELECT), await rows("queues", QUEUE_SELECT),
                                   await rows("mailboxes", MAILBOX_SELECT), [], await rows("teams", TEAM_SELECT))
    return found


async def _first_id(client: Any, entity_set: str, key: str, filter: str | None = None) -> str | None:
    async for row in client.list(entity_set, select=[key], filter=filter, top=1):
        return str(row[key])
    return None


async def _sandbox(report: DoctorReport, client: Any, schema: Any, app_user: str | None) -> None:
    """Throw-away records exercising each bind and the outbound state path; everything is deleted at the end."""
    from core.adapters.dataverse import PreconditionFailedError
    from core.domain.model import CrmRecordRef
    from core.domain.org_schema import DOCUMENTED
    from core.domain.queue_items import QueueItemPlan, QueueItemReason, queue_item_id_for
    from core.services.queue_items_crm import queue_item_body

    schema = schema or DOCUMENTED
    area = "sandbox"
    created: list[tuple[str, str]] = []  # (entity set, id), deleted in reverse
    emails = schema.entity_set("email") or "emails"

    async def new_email(extra: Mapping[str, Any] | None = None) -> str:
        rid = str(uuid.uuid4())
        body = {"activityid": rid, "subject": SANDBOX_SUBJECT, "directioncode": True, **(extra or {})}
        await client.create(emails, body)
        created.append((emails, rid))
        return rid

    try:
        first: dict[str, str] = {}

        async def create_email() -> str:
            first["id"] = await new_email()
            return f"email {first['id']} created"

        if not await _guard(report, area, "create a throw-away email", create_email):
            return
        target: dict[str, str] = {}

        async def create_second() -> str:
            target["id"] = await new_email()
            return "second email created (the binds below are set on it)"

        if not await _guard(report, area, "create a second email", create_second):
            return
        mailbox_id = await _first_id(client, schema.entity_set("mailbox") or "mailboxes", "mailboxid")
        contact_id = await _first_id(client, schema.entity_set("contact") or "contacts", "contactid")
        queue_id = await _first_id(client, schema.entity_set("queue") or "queues", "queueid")
        binds: list[tuple[str, str, str, str | None]] = [
            ("ownerid", "systemuser", "owner", app_user),
            ("receivingmailboxid", "mailbox", "receiving mailbox", mailbox_id),
            ("parentactivityid", "email", "parent activity", first["id"]),
            ("correlatedactivityid", "email", "correlated activity", first["id"]),
            ("regardingobjectid", "contact", "regarding", contact_id),
        ]
        for attribute, table, what, record in binds:
            name = f"bind email.{attribute} -> {table}"
            nav = schema.nav("email", attribute, table)
            path = schema.bind_path(table, record) if record else None
            if nav is None or path is None:
                report.add(area, name, Outcome.SKIP if nav else Outcome.FAIL,
                           f"no {table} record to bind to" if nav else f"no navigation property declared ({what})")
                continue
            await _guard(report, area, name, _patch_bind(client, emails, target["id"], nav, path))

        async def parties() -> str:
            sender = schema.nav("activityparty", "partyid", "systemuser")
            to = schema.nav("activityparty", "partyid", "contact")
            rows: list[dict[str, Any]] = []
            if sender and app_user:
                rows.append({"participationtypemask": 1, f"{sender}@odata.bind": f"/systemusers({app_user})"})
            if to and contact_id:
                rows.append({"participationtypemask": 2, f"{to}@odata.bind": schema.bind_path("contact", contact_id)})
            rows.append({"participationtypemask": 2, "addressused": "doctor-sandbox@example.invalid"})
            await new_email({"email_activity_parties": rows})
            return f"deep insert of {len(rows)} parties ({sender}, {to}, unresolved address)"

        await _guard(report, area, "activity parties (partyid_*)", parties)

        async def attachment() -> str:
            nav = schema.nav("activitymimeattachment", "objectid", "email")
            if not nav:
                raise RuntimeError("no navigation property declared for activitymimeattachment.objectid -> email")
            attachments = schema.entity_set("activitymimeattachment") or "activitymimeattachments"
            rid = str(uuid.uuid4())
            await client.create(attachments, {
                "activitymimeattachmentid": rid, "filename": "doctor.txt", "mimetype": "text/plain",
                "body": base64.b64encode(b"doctor").decode(), "objecttypecode": "email",
                f"{nav}@odata.bind": schema.bind_path("email", target["id"])})
            return f"{nav}@odata.bind"

        await _guard(report, area, "attachment (objectid -> email)", attachment)

        async def queue_item() -> str:
            if not queue_id:
                raise RuntimeError("no queue in the org to put an item in")
            email_id = uuid.UUID(target["id"])
            item = QueueItemPlan(queue_item_id_for(email_id, uuid.UUID(queue_id)),
                                 CrmRecordRef("queue", uuid.UUID(queue_id)), email_id, QueueItemReason.QUEUE_RECIPIENT)
            queue_items = schema.entity_set("queueitem") or "queueitems"
            await client.create(queue_items, queue_item_body(item, schema))
            created.append((queue_items, str(item.queue_item_id)))
            return "queueitem created with " + ", ".join(k for k in queue_item_body(item, schema) if "@" in k)

        await _guard(report, area, "queue item (objectid, queueid)", queue_item)
        await _outbound_path(report, client, emails, new_email, PreconditionFailedError)
    finally:
        problems = []
        for entity_set, rid in reversed(created):
            try:
                await client.delete(entity_set, rid)
            except Exception as exc:
                problems.append(f"{entity_set}({rid}): {_describe(exc)}")
        report.add(area, "cleanup", Outcome.FAIL if problems else Outcome.PASS,
                   "; ".join(problems) if problems else f"{len(created)} record(s) deleted")


def _patch_bind(client: Any, entity_set: str, rid: str, nav: str, path: str) -> Callable[[], Awaitable[str]]:
    async def step() -> str:
        await client.update(entity_set, rid, {f"{nav}@odata.bind": path})
        return f"{nav}@odata.bind accepted"

    return step


async def _outbound_path(report: DoctorReport, client: Any, emails: str,
                         new_email: Callable[..., Awaitable[str]], precondition_failed: type[Exception]) -> None:
    """Pending Send -> Sending (If-Match) -> a stale ETag refused -> Sent by a status change; Date Sent."""
    area = "sandbox"
    rid = await new_email()
    state: dict[str, str | None] = {}

    async def pending() -> str:
        state["etag"] = await client.update(emails, rid, {"statecode": 1, "statuscode": 6}, return_etag=True)
        if not state["etag"]:
            row = await client.get(emails, rid, select=["activityid"])
            state["etag"] = row.get("@odata.etag")
        return "status-only PATCH to Pending Send {1,6}"

    if not await _guard(report, area, "outbound: Pending Send", pending):
        return

    async def claim() -> str:
        state["old"] = state["etag"]
        state["etag"] = await client.update(emails, rid, {"statecode": 1, "statuscode": 7}, if_match=state["etag"],
                                            return_etag=True)
        return "If-Match claim Pending Send -> Sending accepted"

    if not await _guard(report, area, "outbound: claim with If-Match", claim):
        return

    async def stale() -> str:
        try:
            await client.update(emails, rid, {"statecode": 1, "statuscode": 6}, if_match=state["old"])
        except precondition_failed:
            return "a second claim with the old ETag is refused (412): one winner per version"
        raise RuntimeError("a PATCH with a stale ETag was accepted: two workers could claim the same email")

    await _guard(report, area, "outbound: stale ETag refused", stale)

    async def sent() -> str:
        current = await client.get(emails, rid, select=["activityid"])
        await client.update(emails, rid, {"statecode": 1, "statuscode": 3}, if_match=current.get("@odata.etag"))
        return "Sending -> Sent by a status-only PATCH (the email is never re-opened)"

    if not await _guard(report, area, "outbound: Sending -> Sent", sent):
        return
    row = await client.get(emails, rid, select=["senton", "statecode", "statuscode"])
    if row.get("senton"):
        report.add(area, "outbound: Date Sent", Outcome.PASS, f"the platform stamped senton = {row['senton']}")
    else:
        report.add(area, "outbound: Date Sent", Outcome.WARN,
                   "the platform did not stamp senton on the status change: sent emails show no Date Sent here")


async def _graph_sandbox(report: DoctorReport, graph: Any, mailbox: str) -> None:
    from core.domain.identity import outbound_message_id

    area = "sandbox"
    chosen = outbound_message_id(uuid.uuid4(), "doctor", mailbox.rpartition("@")[2])
    try:
        draft = await graph.create_draft(mailbox, {"subject": SANDBOX_SUBJECT, "internetMessageId": chosen,
                                                   "body": {"contentType": "text", "content": ""}})
    except Exception as exc:
        report.add(area, "Graph: chosen Message-ID kept", Outcome.FAIL,
                   f"a draft with a chosen internetMessageId was refused in {mailbox} ({_describe(exc)}); set "
                   "OUTBOUND_CHOOSE_MESSAGE_ID=false")
        return
    kept = draft.get("internetMessageId") == chosen
    try:
        await graph.delete_message(mailbox, str(draft.get("id", "")))
    except Exception as exc:
        report.add(area, "Graph: draft cleanup", Outcome.FAIL, f"draft left in {mailbox}'s Drafts ({_describe(exc)})")
    report.add(area, "Graph: chosen Message-ID kept", Outcome.PASS if kept else Outcome.WARN,
               f"Exchange kept the router's Message-ID on a draft in {mailbox}" if kept else
               f"Exchange replaced the chosen Message-ID ({draft.get('internetMessageId')}); replies to router mail "
               "then correlate by tracking token only")


# ------------------------------------------------------------------------------------------------ CLI


async def _outbound_mailbox(container: Any, wanted: str | None) -> str | None:
    if wanted:
        return wanted
    try:
        from core.domain.model import OutboundMethod

        for mb in await container.mailbox_directory.list_mailboxes():
            if mb.outbound_method is OutboundMethod.ROUTER and mb.enabled_for_outgoing:
                return str(mb.address)
    except Exception:  # no settings table reachable: the Graph sandbox step is skipped with its reason
        return None
    return None


def _doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sandbox", action="store_true",
                        help="create one throw-away email, exercise every bind and the outbound state path, delete it")
    parser.add_argument("--mailbox", help="router mailbox for the Graph draft check (default: the first router-"
                                          "outbound mailbox in the settings table)")


@command("doctor", help="check the org after deploying: metadata, privileges, Server-Side Sync, settings; "
                        "--sandbox also writes and deletes throw-away records",
         description="Read-only by default: the navigation properties and entity sets the router binds, optimistic "
                     "concurrency on email, the application user's privileges, mailboxes where Server-Side Sync "
                     "also serves a direction, and app settings still holding a Key Vault reference. Exit 1 when "
                     "any check fails.",
         arguments=_doctor_arguments,
         examples=["emailrouter doctor", "emailrouter doctor --sandbox --json"])
async def doctor(container: Any, args: argparse.Namespace, out: Any) -> int:
    """The ``emailrouter doctor`` handler: run, print the table (or JSON), exit 1 on any failure."""
    from rich.table import Table

    sandbox = bool(getattr(args, "sandbox", False))
    mailbox = await _outbound_mailbox(container, getattr(args, "mailbox", None)) if sandbox else None
    report = await run_doctor(container.dataverse, sandbox=sandbox, settings=getattr(container.settings, "_env", None),
                              graph=container.graph if mailbox else None, mailbox=mailbox)
    styles = {Outcome.PASS: "green", Outcome.WARN: "yellow", Outcome.FAIL: "bold red", Outcome.SKIP: "dim"}

    def render(console: Any) -> None:
        table = Table(title="emailrouter doctor" + (" (sandbox)" if sandbox else ""))
        for col in ("area", "check", "result", "detail"):
            table.add_column(col, overflow="fold")
        for c in report.checks:
            style = styles[c.outcome]
            table.add_row(c.area, c.name, f"[{style}]{c.outcome.value.upper()}[/{style}]", c.detail)
        console.print(table)
        summary = report.to_json()["counts"]
        console.print(("[green]all checks passed[/green]" if report.ok else
                       f"[bold red]{summary['fail']} check(s) failed[/bold red]")
                      + f" ({summary['pass']} pass, {summary['warn']} warn, {summary['skip']} skipped)")

    out.emit(report.to_json(), render)
    return 0 if report.ok else 1
