"""Seed documents: the demo organization and the loader that applies a seed (additively) to a store.

Seed records go through the same create path as Web API requests (``Dataverse.create_record``), so a seeded user
gets its mailbox and usersettings exactly like a user created over the API, and ``@odata.bind`` works in seeds.
Format: see docs/dataverse-emulator.md ("Seed format").
"""

from __future__ import annotations

import copy
import uuid
from typing import Any, Final

from emulators.common import demo

from .errors import DataverseError
from .schema import ENTITIES
from .service import Caller, Dataverse, now_iso
from .store import Row

__all__ = ["DEFAULT_ORG_SETTINGS", "ROUTER_APP_PRIVILEGES", "SYSTEM_USER_ID", "SeedError", "apply_seed", "demo_seed",
           "demo_user_id"]

SYSTEM_USER_ID: Final = "00000000-0000-4000-8000-00000000c0de"
ORG_ID: Final = "c0ffee00-0000-4000-8000-0000000000d0"
ROOT_BU_ID: Final = "c0ffee00-0000-4000-8000-0000000000b0"
APP_USER_ID: Final = "c0ffee00-0000-4000-8000-0000000000a3"

# Organization defaults (dataverse.md §4.2, crm-email-behaviour.md §6.2/§2.3). Values the references leave open are
# marked; all can be overridden in the seed's organization.settings.
DEFAULT_ORG_SETTINGS: Final[dict[str, Any]] = {
    "maxuploadfilesize": 5242880,
    "allowunresolvedpartiesonemailsend": False,
    "ignoreinternalemail": False,
    "emailcorrelationenabled": True,
    "enablesmartmatching": False,
    "hashdeltasubjectcount": 0,
    "hashfilterkeywords": r"^[\s]*([\w]+\s?:[\s]*)+",
    "hashmaxcount": 20,
    "hashminaddresscount": 2,
    "maximumtrackingnumber": 999,  # default not documented
    "trackingprefix": "CRM:",
    "trackingtokenidbase": 0,
    "trackingtokeniddigits": 3,
    "requireapprovalforuseremail": True,
    "requireapprovalforqueueemail": True,
    "emailsendpollingperiod": 60,
    "unresolveemailaddressifmultiplematch": False,  # default not documented
    "rendersecureiframeforemail": True,
}

# What an admin grants the router's application user (the security role docs/deploy.md describes): every
# privilege `emailrouter doctor` checks, at organization (Global) depth, plus impersonation.
ROUTER_APP_PRIVILEGES: Final[tuple[str, ...]] = (
    "prvActOnBehalfOfAnotherUser",
    "prvCreateActivity", "prvReadActivity", "prvWriteActivity", "prvAppendActivity", "prvAppendToActivity",
    "prvAssignActivity", "prvDeleteActivity",
    "prvReadContact", "prvCreateContact", "prvReadAccount", "prvReadLead", "prvReadUser", "prvReadQueue",
    "prvAppendToContact", "prvAppendToAccount", "prvAppendToLead",
    "prvAppendToQueue", "prvReadMailbox", "prvWriteMailbox", "prvReadOrganization", "prvReadUserSettings",
    "prvReadTeam",
)

_SEED_SETS: Final = ("businessunits", "teams", "emailserverprofiles", "systemusers", "queues", "accounts",
                     "contacts", "leads", "opportunities", "incidents", "equipments")


class SeedError(ValueError):
    pass


def demo_user_id(local_part: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-emulator/user/{local_part}"))


def demo_object_id(local_part: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"entra/user/{local_part}@{demo.TENANT_DOMAIN}"))


def _user(local: str, first: str, last: str, incoming: int, outgoing: int, approval: int = 1) -> dict[str, Any]:
    return {
        "systemuserid": demo_user_id(local), "firstname": first, "lastname": last,
        "internalemailaddress": f"{local}@{demo.TENANT_DOMAIN}", "domainname": f"{local}@{demo.TENANT_DOMAIN}",
        "azureactivedirectoryobjectid": demo_object_id(local), "incomingemaildeliverymethod": incoming,
        "outgoingemaildeliverymethod": outgoing, "emailrouteraccessapproval": approval,
        "isemailaddressapprovedbyo365admin": approval == 1,
    }


def demo_seed() -> dict[str, Any]:
    """The demo org: the router's application user, four users with different delivery methods, a queue, CRM
    contacts/accounts/leads to resolve senders against."""
    return copy.deepcopy({
        "organization": {"organizationid": ORG_ID, "name": "Contoso (emulator)", "settings": {}},
        "businessunits": [{"businessunitid": ROOT_BU_ID, "name": "Contoso"}],
        "systemusers": [
            {"systemuserid": APP_USER_ID, "firstname": "# Email Router", "lastname": "(app)",
             "internalemailaddress": f"emailrouter-app@{demo.TENANT_DOMAIN}", "applicationid": demo.APP_CLIENT_ID,
             "azureactivedirectoryobjectid": demo.APP_OBJECT_ID, "accessmode": 4,
             "incomingemaildeliverymethod": 0, "outgoingemaildeliverymethod": 0,
             "privileges": list(ROUTER_APP_PRIVILEGES)},
            _user("alice", "Alice", "Archer", 2, 2),  # router inbound + outbound
            _user("bob", "Bob", "Baker", 3, 2),  # forward mailbox inbound, router outbound
            {**_user("carol", "Carol", "Clark", 1, 1), "usersettings": {"incomingemailfilteringmethod": 0}},
            _user("dave", "Dave", "Dunn", 0, 0, approval=0),  # no email processing
        ],
        "queues": [
            {"queueid": "c0ffee00-0000-4000-8000-0000000000e1", "name": "Support",
             "emailaddress": f"support@{demo.TENANT_DOMAIN}", "incomingemaildeliverymethod": 2,
             "outgoingemaildeliverymethod": 2, "emailrouteraccessapproval": 1, "incomingemailfilteringmethod": 0,
             "ownerid@odata.bind": f"/systemusers({demo_user_id('alice')})"},
        ],
        "accounts": [
            {"accountid": "c0ffee00-0000-4000-8000-00000000ac01", "name": "Fabrikam",
             "emailaddress1": "info@fabrikam.example"},
        ],
        "contacts": [
            {"contactid": "c0ffee00-0000-4000-8000-00000000c001", "firstname": "Fiona", "lastname": "Fabrikam",
             "emailaddress1": "fiona@fabrikam.example",
             "parentcustomerid_account@odata.bind": "/accounts(c0ffee00-0000-4000-8000-00000000ac01)"},
            {"contactid": "c0ffee00-0000-4000-8000-00000000c002", "firstname": "Gus", "lastname": "Gray",
             "emailaddress1": "gus@example.org", "emailaddress2": "gus.gray@fabrikam.example"},
        ],
        "leads": [
            {"leadid": "c0ffee00-0000-4000-8000-000000001e01", "firstname": "Lena", "lastname": "Lead",
             "subject": "Interested in routing", "emailaddress1": "lena@prospect.example"},
        ],
    })


def _system_caller() -> Caller:
    return Caller(user_id=SYSTEM_USER_ID)


def _ensure_system(dv: Dataverse) -> None:
    ent = ENTITIES["systemuser"]
    if dv.store.exists(ent, SYSTEM_USER_ID):
        return
    now = now_iso()
    row: Row = {"systemuserid": SYSTEM_USER_ID, "firstname": "SYSTEM", "fullname": "SYSTEM", "isdisabled": False,
                "accessmode": 4, "incomingemaildeliverymethod": 0, "outgoingemaildeliverymethod": 0,
                "createdon": now, "modifiedon": now}
    dv.store.insert(ent, SYSTEM_USER_ID, row)


def _apply_org(dv: Dataverse, org: dict[str, Any] | None) -> None:
    ent = ENTITIES["organization"]
    existing = dv.store.all(ent)
    if org is None and existing:
        return
    org = org or {}
    settings = org.get("settings") or {}
    unknown = [k for k in settings if k not in ent.columns]
    if unknown:
        raise SeedError(f"organization.settings has unknown columns: {', '.join(sorted(unknown))}")
    if existing:
        row = existing[0]
        row.update(settings)
        if org.get("name"):
            row["name"] = org["name"]
        dv.store.replace(ent, row["organizationid"], row)
        return
    now = now_iso()
    oid = str(org.get("organizationid") or ORG_ID).lower()
    row = {"organizationid": oid, "name": org.get("name") or "Emulated organization", **DEFAULT_ORG_SETTINGS,
           **settings, "createdon": now, "modifiedon": now}
    dv.store.insert(ent, oid, row)


def apply_seed(dv: Dataverse, seed: dict[str, Any]) -> dict[str, int]:
    """Apply ``seed`` additively (records whose id already exists are updated). Returns counts per set."""
    if not isinstance(seed, dict):
        raise SeedError("the seed must be a JSON object")
    unknown = [k for k in seed if k not in (*_SEED_SETS, "organization", "usersettings")]
    if unknown:
        raise SeedError(f"unknown seed sections: {', '.join(sorted(unknown))}")
    # Seeds may carry system-maintained columns (read-only for API clients): they are the platform's own state, so
    # they are written, not refused or dropped.
    seeder = Dataverse(dv.store, dv.options, dv.variant, system_writes=True)
    counts: dict[str, int] = {}
    try:
        with dv.store.transaction():
            _ensure_system(seeder)
            _apply_org(seeder, seed.get("organization"))
            for set_name in _SEED_SETS:
                ent = next(e for e in ENTITIES.values() if e.entity_set == set_name)
                for raw in seed.get(set_name) or []:
                    if not isinstance(raw, dict):
                        raise SeedError(f"{set_name} entries must be objects")
                    rec = dict(raw)
                    privileges = rec.pop("privileges", None)
                    mailbox = rec.pop("mailbox", None)
                    usersettings = rec.pop("usersettings", None)
                    rid = str(rec.get(ent.primary_id) or uuid.uuid4()).lower()
                    rec[ent.primary_id] = rid
                    if seeder.store.exists(ent, rid):
                        before = seeder.store.get(ent, rid)
                        assert before is not None
                        rec.pop(ent.primary_id)
                        seeder.update_record(ent, rid, before, rec, _system_caller(), {})
                    else:
                        seeder.create_record(ent, rec, _system_caller(), {})
                    row = seeder.store.get(ent, rid)
                    assert row is not None
                    if privileges is not None:
                        row["~privileges"] = list(privileges)
                        seeder.store.replace(ent, rid, row)
                    if mailbox and row.get("_defaultmailbox_value"):
                        _merge(seeder, "mailbox", row["_defaultmailbox_value"], mailbox)
                    if usersettings and ent.logical_name == "systemuser":
                        _merge(seeder, "usersettings", rid, usersettings)
                    counts[set_name] = counts.get(set_name, 0) + 1
            for us in seed.get("usersettings") or []:
                _merge(seeder, "usersettings", str(us["systemuserid"]).lower(),
                       {k: v for k, v in us.items() if k != "systemuserid"})
    except DataverseError as err:
        raise SeedError(f"seed rejected: {err.message}") from err
    return counts


def _merge(dv: Dataverse, logical: str, rid: str, values: dict[str, Any]) -> None:
    ent = ENTITIES[logical]
    row = dv.store.get(ent, rid)
    if row is None:
        raise SeedError(f"{logical} {rid} does not exist")
    for k, v in values.items():
        col = ent.column_for_key(k)
        if col is None:
            raise SeedError(f"{logical} has no column {k}")
        row[col.value_key] = dv.coerce(ent, col, v)
    dv.store.replace(ent, rid, row)
