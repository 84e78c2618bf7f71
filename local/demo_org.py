"""The Contoso demo org: ONE description that generates consistent seeds for every emulator.

``make run`` and ``make demo`` show the router on this org. Every person exists once here and the seeds derive
from it, so the same address has the same Entra object id in the identity platform (tokens), in Exchange (the
Graph user id) and in CRM (``systemuser.azureactivedirectoryobjectid``), and the same ``systemuserid`` wherever
CRM rows refer to it.

People (all ``@contoso.example``) — one per CRM 2011 Email Router / SSS option, with different tracking filters:

==========  =================  ===========  ======================  ==========================================
mailbox     incoming           outgoing     tracking filter         what it shows
==========  =================  ===========  ======================  ==========================================
alice       individual (SSS)   router       1 replies to CRM email  sends from CRM; external replies come back
bob         forward mailbox    router       0 all email messages    rule forwards as attachment to crm-sink
carol       Outlook client     Outlook      0 all                   the router leaves her mail alone
dave        none               none         1 (default)             not approved, no email processing at all
erin        individual (SSS)   none         2 leads/contacts/accts  only customer mail is tracked
frank       individual (SSS)   none         3 email-enabled records also colleagues' mail is tracked
grace       individual (SSS)   none         4 no email messages     nothing is tracked automatically
hana        individual (SSS)   router       0 all email messages    UPN hana.hill@, mail hana@: Graph by object id
support     queue, individual  router       0 all                   shared mailbox owned by alice
crm-sink    forward mailbox    -            -                       collects bob's forwarded mail
==========  =================  ===========  ======================  ==========================================

CRM records to resolve and correlate to: accounts Fabrikam and Northwind Traders, contacts Fiona (Fabrikam), Gus
and Nora (Northwind), leads Lena and Liam, the opportunity "Email routing rollout" (Fabrikam) and the case "Mail
not arriving in CRM" (Gus).

Generators: :func:`identity_seed`, :func:`graph_seed`, :func:`dataverse_seed` (files for the emulators'
``--seed``; :func:`write_seed_files` writes all three), :func:`crm_runtime_records` (rows the Dataverse seed
format cannot carry — the forward mailbox record — created over the Web API by :func:`apply_runtime_seed`), and
:func:`settings_rows` (settings-table rows; empty by default: the router reads everything from CRM).

CLI::

    python -m local.demo_org write-seeds [--out .local/seeds]     # the three seed JSON files
    python -m local.demo_org apply [--state-dir .local]          # runtime part against a running stack
    python -m local.demo_org show                                 # the table above, from the data
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from emulators.common import demo
from emulators.dataverse.seed import ROUTER_APP_PRIVILEGES

__all__ = [
    "ACCOUNTS",
    "CASE",
    "CONTACTS",
    "DOMAIN",
    "LEADS",
    "OPPORTUNITY",
    "PEOPLE",
    "QUEUE",
    "SINK",
    "CrmRecord",
    "Person",
    "apply_runtime_seed",
    "apply_runtime_seed_from_stack",
    "crm_runtime_records",
    "dataverse_seed",
    "entra_object_id",
    "graph_seed",
    "identity_seed",
    "person",
    "settings_rows",
    "systemuser_id",
    "write_seed_files",
]

DOMAIN: Final = demo.TENANT_DOMAIN

# Ids shared with the Dataverse emulator's own demo seed (same org, business unit and application user).
ORG_ID: Final = "c0ffee00-0000-4000-8000-0000000000d0"
ROOT_BU_ID: Final = "c0ffee00-0000-4000-8000-0000000000b0"
APP_USER_ID: Final = "c0ffee00-0000-4000-8000-0000000000a3"

# CRM option values (crm-email-behaviour reference §2.1, §5.1).
NONE, OUTLOOK, ROUTER, FORWARD = 0, 1, 2, 3
FILTER_ALL, FILTER_REPLIES, FILTER_CONTACTS, FILTER_RECORDS, FILTER_NONE = 0, 1, 2, 3, 4
APPROVED, NOT_APPROVED = 1, 0


def entra_object_id(address: str) -> str:
    """The Entra object id of a demo mailbox (also its Graph user id): ``uuid5(URL, "entra/user/<address>")``,
    the convention of the Dataverse emulator's seed."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"entra/user/{address.lower()}"))


def systemuser_id(local_part: str) -> str:
    """``systemuserid`` of a demo user (same derivation as ``emulators.dataverse.seed.demo_user_id``)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-emulator/user/{local_part}"))


@dataclass(frozen=True)
class Person:
    """A Contoso user: an Exchange mailbox, an Entra user and a CRM systemuser."""

    alias: str
    first: str
    last: str
    incoming: int
    outgoing: int
    tracking_filter: int
    approval: int = APPROVED
    title: str = ""
    story: str = ""
    upn_alias: str = ""  # when the user principal name differs from the primary SMTP address (renamed users)

    @property
    def address(self) -> str:
        """The primary SMTP address: what CRM holds (``internalemailaddress``) and mail is sent to."""
        return f"{self.alias}@{DOMAIN}"

    @property
    def upn(self) -> str:
        return f"{self.upn_alias or self.alias}@{DOMAIN}"

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    @property
    def object_id(self) -> str:
        return entra_object_id(self.address)

    @property
    def systemuser_id(self) -> str:
        return systemuser_id(self.alias)


@dataclass(frozen=True)
class Mailbox:
    """A mailbox that is not a person: the support queue's shared mailbox or the forward (sink) mailbox."""

    alias: str
    name: str
    record_id: str  # queueid for the queue, mailboxid for the sink

    @property
    def address(self) -> str:
        return f"{self.alias}@{DOMAIN}"

    @property
    def object_id(self) -> str:
        return entra_object_id(self.address)


@dataclass(frozen=True)
class CrmRecord:
    table: str
    id: str
    name: str
    email: str = ""

    @property
    def entity_set(self) -> str:
        return {"account": "accounts", "contact": "contacts", "lead": "leads", "opportunity": "opportunities",
                "incident": "incidents"}[self.table]


PEOPLE: Final[tuple[Person, ...]] = (
    Person("alice", "Alice", "Archer", ROUTER, ROUTER, FILTER_REPLIES, title="Account Manager",
           story="individual mailbox in and out; tracks replies to CRM email"),
    Person("bob", "Bob", "Baker", FORWARD, ROUTER, FILTER_ALL, title="Sales Rep",
           story="forward mailbox: an inbox rule forwards every message as an attachment to crm-sink"),
    Person("carol", "Carol", "Clark", OUTLOOK, OUTLOOK, FILTER_ALL, title="Consultant",
           story="Outlook client: the Outlook add-in tracks, the router does nothing"),
    Person("dave", "Dave", "Dunn", NONE, NONE, FILTER_REPLIES, approval=NOT_APPROVED, title="Intern",
           story="no email processing (and not approved)"),
    Person("erin", "Erin", "Evans", ROUTER, NONE, FILTER_CONTACTS, title="Customer Success",
           story="tracks mail from leads, contacts and accounts only"),
    Person("frank", "Frank", "Fisher", ROUTER, NONE, FILTER_RECORDS, title="Support Engineer",
           story="tracks mail from any email-enabled record (colleagues too)"),
    Person("grace", "Grace", "Green", ROUTER, NONE, FILTER_NONE, title="Finance",
           story="individual mailbox, but the filter tracks nothing automatically"),
    Person("hana", "Hana", "Hill", ROUTER, ROUTER, FILTER_ALL, title="Partner Manager", upn_alias="hana.hill",
           story="UPN hana.hill@ differs from her mail address hana@: Graph reaches her by object id"),
)

QUEUE: Final = Mailbox("support", "Support", "c0ffee00-0000-4000-8000-0000000000e1")
QUEUE_OWNER: Final = "alice"
SINK: Final = Mailbox("crm-sink", "CRM Forward Mailbox", "c0ffee00-0000-4000-8000-0000000000f1")

ACCOUNTS: Final = (
    CrmRecord("account", "c0ffee00-0000-4000-8000-00000000ac01", "Fabrikam", "info@fabrikam.example"),
    CrmRecord("account", "c0ffee00-0000-4000-8000-00000000ac02", "Northwind Traders", "sales@northwind.example"),
)
CONTACTS: Final = (
    CrmRecord("contact", "c0ffee00-0000-4000-8000-00000000c001", "Fiona Fabrikam", "fiona@fabrikam.example"),
    CrmRecord("contact", "c0ffee00-0000-4000-8000-00000000c002", "Gus Gray", "gus@example.org"),
    CrmRecord("contact", "c0ffee00-0000-4000-8000-00000000c003", "Nora North", "nora@northwind.example"),
)
LEADS: Final = (
    CrmRecord("lead", "c0ffee00-0000-4000-8000-000000001e01", "Lena Lead", "lena@prospect.example"),
    CrmRecord("lead", "c0ffee00-0000-4000-8000-000000001e02", "Liam Lyons", "liam@startup.example"),
)
OPPORTUNITY: Final = CrmRecord("opportunity", "c0ffee00-0000-4000-8000-0000000000f0", "Email routing rollout")
CASE: Final = CrmRecord("incident", "c0ffee00-0000-4000-8000-0000000000ca", "Mail not arriving in CRM")

FORWARD_RULE_NAME: Final = "Track in Dynamics 365 (forward as attachment)"
FORWARD_RULE_ID: Final = "AQAAAAAAAAE="


def person(alias: str) -> Person:
    for p in PEOPLE:
        if p.alias == alias:
            return p
    raise KeyError(alias)


# ------------------------------------------------------------------------------------------------ identity


def identity_seed() -> dict[str, Any]:
    """Tenant Contoso and the router's app registration (secret from ``emulators/common/demo.py``, Graph app
    roles granted; Dataverse needs no role: the app is an application user in CRM)."""
    return {
        "tenants": [{"id": demo.TENANT_ID, "domains": [DOMAIN], "display_name": "Contoso (local demo)"}],
        "apps": [{
            "client_id": demo.APP_CLIENT_ID,
            "tenant_id": demo.TENANT_ID,
            "display_name": "Email Router for Dynamics 365 (local demo)",
            "object_id": demo.APP_OBJECT_ID,
            "secrets": [demo.APP_CLIENT_SECRET],
            "certificates": [],
            "roles": {demo.GRAPH_RESOURCE: list(demo.GRAPH_APP_ROLES)},
        }],
        "resources": None,
    }


# ------------------------------------------------------------------------------------------------ Graph


def forward_rule(sink_address: str = SINK.address) -> dict[str, Any]:
    """The Exchange inbox rule the CRM Rule Deployment Wizard used to create (and ``emailrouter forward-rules
    deploy`` creates today): every message, forwarded **as an attachment** to the sink."""
    return {
        "id": FORWARD_RULE_ID,  # stable: re-applying the seed replaces the rule instead of adding a second one
        "displayName": FORWARD_RULE_NAME,
        "sequence": 1,
        "isEnabled": True,
        "conditions": {},
        "actions": {"forwardAsAttachmentTo": [{"emailAddress": {"name": SINK.name, "address": sink_address}}]},
    }


def graph_seed() -> dict[str, Any]:
    """Exchange Online: every person, the support shared mailbox and the sink, with user id = Entra object id;
    bob's forward-as-attachment rule deployed. No access policy: the app may use every mailbox."""
    users: list[dict[str, Any]] = []
    for p in PEOPLE:
        user: dict[str, Any] = {"id": p.object_id, "userPrincipalName": p.upn, "displayName": p.name,
                                "mail": p.address}
        if p.upn != p.address:
            user["proxyAddresses"] = [f"SMTP:{p.address}", f"smtp:{p.upn}"]
        if p.incoming == FORWARD:
            user["rules"] = [forward_rule()]
        users.append(user)
    for mbx in (QUEUE, SINK):
        users.append({"id": mbx.object_id, "userPrincipalName": mbx.address, "displayName": mbx.name,
                      "mail": mbx.address})
    return {"tenantId": demo.TENANT_ID, "domains": [DOMAIN], "users": users}


# ------------------------------------------------------------------------------------------------ Dataverse


def _systemuser(p: Person) -> dict[str, Any]:
    return {
        "systemuserid": p.systemuser_id, "firstname": p.first, "lastname": p.last, "title": p.title,
        "internalemailaddress": p.address, "domainname": p.upn,
        "azureactivedirectoryobjectid": p.object_id, "incomingemaildeliverymethod": p.incoming,
        "outgoingemaildeliverymethod": p.outgoing, "emailrouteraccessapproval": p.approval,
        "isemailaddressapprovedbyo365admin": p.approval == APPROVED,
        "usersettings": {"incomingemailfilteringmethod": p.tracking_filter},
    }


def dataverse_seed() -> dict[str, Any]:
    """Dynamics 365: org settings, the application user, every person with delivery methods, approval and
    tracking filter, the Support queue, and the customer records the router resolves and correlates to."""
    fabrikam, northwind = ACCOUNTS
    fiona, gus, nora = CONTACTS
    return {
        "organization": {"organizationid": ORG_ID, "name": "Contoso", "settings": {
            "trackingprefix": "CRM:", "maxuploadfilesize": 5242880, "emailcorrelationenabled": True,
            "ignoreinternalemail": False, "allowunresolvedpartiesonemailsend": True,
        }},
        "businessunits": [{"businessunitid": ROOT_BU_ID, "name": "Contoso"}],
        "systemusers": [
            {"systemuserid": APP_USER_ID, "firstname": "# Email Router", "lastname": "(app)",
             "internalemailaddress": f"emailrouter-app@{DOMAIN}", "applicationid": demo.APP_CLIENT_ID,
             "azureactivedirectoryobjectid": demo.APP_OBJECT_ID, "accessmode": 4,
             "incomingemaildeliverymethod": NONE, "outgoingemaildeliverymethod": NONE,
             "privileges": list(ROUTER_APP_PRIVILEGES)},
            *(_systemuser(p) for p in PEOPLE),
        ],
        "queues": [{
            "queueid": QUEUE.record_id, "name": QUEUE.name, "emailaddress": QUEUE.address,
            "incomingemaildeliverymethod": ROUTER, "outgoingemaildeliverymethod": ROUTER,
            "emailrouteraccessapproval": APPROVED, "isemailaddressapprovedbyo365admin": True,
            "incomingemailfilteringmethod": FILTER_ALL,
            "ownerid@odata.bind": f"/systemusers({systemuser_id(QUEUE_OWNER)})",
        }],
        "accounts": [
            {"accountid": a.id, "name": a.name, "emailaddress1": a.email,
             "ownerid@odata.bind": f"/systemusers({systemuser_id('alice')})"} for a in ACCOUNTS
        ],
        "contacts": [
            {"contactid": fiona.id, "firstname": "Fiona", "lastname": "Fabrikam", "emailaddress1": fiona.email,
             "parentcustomerid_account@odata.bind": f"/accounts({fabrikam.id})",
             "ownerid@odata.bind": f"/systemusers({systemuser_id('alice')})"},
            {"contactid": gus.id, "firstname": "Gus", "lastname": "Gray", "emailaddress1": gus.email,
             "emailaddress2": "gus.gray@fabrikam.example",
             "ownerid@odata.bind": f"/systemusers({systemuser_id('erin')})"},
            {"contactid": nora.id, "firstname": "Nora", "lastname": "North", "emailaddress1": nora.email,
             "parentcustomerid_account@odata.bind": f"/accounts({northwind.id})",
             "ownerid@odata.bind": f"/systemusers({systemuser_id('erin')})"},
        ],
        "leads": [
            {"leadid": LEADS[0].id, "firstname": "Lena", "lastname": "Lead", "subject": "Interested in routing",
             "emailaddress1": LEADS[0].email},
            {"leadid": LEADS[1].id, "firstname": "Liam", "lastname": "Lyons", "subject": "Pricing question",
             "emailaddress1": LEADS[1].email},
        ],
        "opportunities": [
            {"opportunityid": OPPORTUNITY.id, "name": OPPORTUNITY.name,
             "customerid_account@odata.bind": f"/accounts({fabrikam.id})",
             "parentcontactid@odata.bind": f"/contacts({fiona.id})",
             "ownerid@odata.bind": f"/systemusers({systemuser_id('alice')})"},
        ],
        "incidents": [
            {"incidentid": CASE.id, "title": CASE.name, "ticketnumber": "CAS-01001",
             "customerid_contact@odata.bind": f"/contacts({gus.id})",
             "ownerid@odata.bind": f"/systemusers({systemuser_id('alice')})"},
        ],
    }


def crm_runtime_records() -> list[tuple[str, str, dict[str, Any]]]:
    """CRM rows the seed format has no section for, as ``(entity set, id, create payload)``: the forward mailbox
    record (no regarding user or queue) — an admin creates it in CRM, and the router's CRM sync turns it into the
    sink bob's mailbox forwards to. Only columns valid for create (mailbox.md): ``isforwardmailbox`` is read-only
    and defaults to Yes for a mailbox created this way; the ``enabledfor*`` flags default to Yes."""
    return [("mailboxes", SINK.record_id, {
        "mailboxid": SINK.record_id, "name": SINK.name, "emailaddress": SINK.address,
        "incomingemaildeliverymethod": ROUTER, "outgoingemaildeliverymethod": NONE,
        "emailrouteraccessapproval": APPROVED, "processanddeleteemails": False,
    })]


def settings_rows() -> dict[str, list[dict[str, Any]]]:
    """Settings-table rows to seed, by logical table name (``core.names``). Empty: the demo org keeps every
    setting in CRM (delivery methods, filters, the forward mailbox), as an admin coming from the CRM 2011 Email
    Router would; the router's CRM sync copies them. Overrides are demonstrated by the walkthrough's
    ``emailrouter mailbox set`` commands instead."""
    return {}


# ------------------------------------------------------------------------------------------------ files


def write_seed_files(directory: Path) -> dict[str, Path]:
    """Write ``identity.json``, ``graph.json`` and ``dataverse.json`` (atomically) and return their paths by
    emulator name. Deterministic: the same org gives byte-identical files."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name, doc in (("identity", identity_seed()), ("graph", graph_seed()), ("dataverse", dataverse_seed())):
        path = directory / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        out[name] = path
    return out


# ------------------------------------------------------------------------------------------------ runtime part


def _token(authority: str, scope: str, ca_bundle: str | Path, *, client_id: str = demo.APP_CLIENT_ID,
           client_secret: str = demo.APP_CLIENT_SECRET) -> str:
    """A client-credentials token from the identity emulator (plain OAuth 2.0, no cache: seeding is rare)."""
    import httpx

    resp = httpx.post(f"{authority.rstrip('/')}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret,
        "scope": scope,
    }, verify=ssl.create_default_context(cafile=str(ca_bundle)), timeout=30)
    resp.raise_for_status()
    return str(resp.json()["access_token"])


def apply_runtime_seed(
    *,
    authority: str,
    dataverse_url: str,
    ca_bundle: str | Path,
    storage_connection_string: str | None = None,
    api_version: str = "v9.2",
) -> list[str]:
    """Create the :func:`crm_runtime_records` that do not exist yet over the Dataverse Web API (idempotent: an
    existing row is left alone, the admin may have changed it) and insert absent :func:`settings_rows`. Returns
    what was created, as text. ``authority`` = ``<identity url>/<tenant id>``."""
    import httpx

    created: list[str] = []
    org = dataverse_url.rstrip("/")
    api = f"{org}/api/data/{api_version}"
    headers = {"Authorization": f"Bearer {_token(authority, f'{org}/.default', ca_bundle)}",
               "Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_bundle)), headers=headers, timeout=30) as client:
        for entity_set, rid, payload in crm_runtime_records():
            got = client.get(f"{api}/{entity_set}({rid})")
            if got.status_code == 200:
                continue
            if got.status_code != 404:
                got.raise_for_status()
            client.post(f"{api}/{entity_set}", json=payload).raise_for_status()
            created.append(f"{entity_set}({rid})")
    rows = settings_rows()
    if rows and storage_connection_string:
        import asyncio

        from core.adapters.storage import StorageAccount

        async def insert() -> None:
            async with StorageAccount(connection_string=storage_connection_string) as account:
                for table, entities in rows.items():
                    store = account.table(table)
                    for entity in entities:
                        if await store.insert_if_absent(entity):
                            created.append(f"{store.name}({entity['PartitionKey']}/{entity['RowKey']})")

        asyncio.run(insert())
    return created


def apply_runtime_seed_from_stack(stack: Mapping[str, Any]) -> list[str]:
    """:func:`apply_runtime_seed` for a running stack, from its ``stack.json`` document."""
    return apply_runtime_seed(
        authority=str(stack["identity"]["authority"]), dataverse_url=str(stack["dataverse"]["url"]),
        ca_bundle=str(stack["ca_bundle"]),
        storage_connection_string=(stack.get("storage") or {}).get("connection_string"),
    )


# ------------------------------------------------------------------------------------------------ CLI


def describe() -> list[tuple[str, str, str, str, str]]:
    """(address, incoming, outgoing, filter, story) per mailbox, for the walkthrough and ``show``."""
    methods = {NONE: "none", OUTLOOK: "Outlook", ROUTER: "router (individual)", FORWARD: "forward mailbox"}
    filters = {FILTER_ALL: "0 all", FILTER_REPLIES: "1 replies to CRM email", FILTER_CONTACTS:
               "2 leads/contacts/accounts", FILTER_RECORDS: "3 email-enabled records", FILTER_NONE: "4 none"}
    out = [(p.address, methods[p.incoming], {NONE: "none", OUTLOOK: "Outlook", ROUTER: "router"}[p.outgoing],
            filters[p.tracking_filter], p.story) for p in PEOPLE]
    out.append((QUEUE.address, "router (queue)", "router", filters[FILTER_ALL],
                f"queue {QUEUE.name}, owned by {QUEUE_OWNER}"))
    out.append((SINK.address, "forward sink", "-", "-", "receives bob's forwarded mail; unwrapped for bob"))
    return out


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.demo_org", description="The Contoso demo org")
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write-seeds", help="write identity.json, graph.json, dataverse.json")
    write.add_argument("--out", type=Path, default=Path(".local/seeds"))
    apply = sub.add_parser("apply", help="create the runtime part (forward mailbox record) on a running stack")
    apply.add_argument("--state-dir", type=Path, default=Path(".local"))
    sub.add_parser("show", help="print the org")
    args = parser.parse_args(argv)
    if args.command == "write-seeds":
        for name, path in write_seed_files(args.out).items():
            print(f"{name}: {path}")
        return 0
    if args.command == "apply":
        stack = json.loads((args.state_dir / "stack.json").read_text())
        for line in apply_runtime_seed_from_stack(stack) or ["nothing to create"]:
            print(line)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Contoso demo org")
    for col in ("mailbox", "incoming", "outgoing", "tracking filter", "what it shows"):
        table.add_column(col)
    for row in describe():
        table.add_row(*row)
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
