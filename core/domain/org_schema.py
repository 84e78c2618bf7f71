"""The names the org declares: entity sets and single-valued navigation properties, as plain data.

Dataverse binds a lookup through its navigation property, whose name is the relationship's
``ReferencingEntityNavigationPropertyName`` - case-sensitive, and not derivable from the column name
(``ReceivingMailboxId_Email``, ``CorrelatedActivityId_Email``, ``ownerid_email``, ``regardingobjectid_contact_email``,
``objectid_email``...). An undeclared name fails the whole change set with 400 ``0x80048d19``. So the router never
spells a name itself: the CRM adapter reads ``EntityDefinitions`` once (cached, refreshed with the CRM sync) into an
:class:`OrgSchema`, and the planners receive it as a value.

A relationship the org does not declare is not bound (the email is still tracked, without that link) and shows up
in :meth:`OrgSchema.missing` for the logs and ``emailrouter doctor``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

__all__ = ["BINDS", "DOCUMENTED", "EmailEnabledTable", "OrgSchema", "Relationship", "WantedBind"]


@dataclass(frozen=True, slots=True)
class Relationship:
    """One ManyToOne relationship of a table (EntityDefinitions(...)/ManyToOneRelationships)."""

    schema_name: str
    referencing_attribute: str
    referenced_entity: str  # a table, or "owner" for the systemuser/team owner lookup
    navigation_property: str


@dataclass(frozen=True, slots=True)
class EmailEnabledTable:
    """A table whose rows an email address can resolve to (EntityMetadata.IsActivityParty: "email messages can be
    sent to an email address stored in a record of this type"), with its Email-format string columns
    (StringAttributeMetadata.FormatName = Email)."""

    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str
    email_columns: tuple[str, ...]
    owned: bool  # OwnershipType UserOwned/TeamOwned: the row has an ownerid
    has_state: bool  # the table has statecode (0 = active)


@dataclass(frozen=True, slots=True)
class WantedBind:
    """A bind the router makes: ``entity.attribute`` -> a row of ``target``."""

    entity: str
    attribute: str
    target: str
    purpose: str
    # Optional: bound only where the org declares an unambiguous name; its absence is normal (acceptingentityid is
    # one name for queue and systemuser on every documented org, and SSS fills it anyway).
    optional: bool = False


# Every bind the router makes, so the adapter knows which relationships to read and the doctor what to check.
BINDS: Final[tuple[WantedBind, ...]] = (
    WantedBind("email", "ownerid", "systemuser", "owner of tracked email"),
    WantedBind("email", "ownerid", "team", "owner of tracked email (team)"),
    WantedBind("email", "receivingmailboxid", "mailbox", "receiving mailbox"),
    WantedBind("email", "parentactivityid", "email", "parent activity of a reply"),
    WantedBind("email", "correlatedactivityid", "email", "correlated activity"),
    WantedBind("email", "acceptingentityid", "systemuser", "accepting user", optional=True),
    WantedBind("email", "acceptingentityid", "queue", "accepting queue", optional=True),
    WantedBind("email", "regardingobjectid", "contact", "regarding"),
    WantedBind("email", "regardingobjectid", "account", "regarding"),
    WantedBind("activityparty", "partyid", "systemuser", "activity party"),
    WantedBind("activityparty", "partyid", "queue", "activity party"),
    WantedBind("activityparty", "partyid", "contact", "activity party"),
    WantedBind("activityparty", "partyid", "account", "activity party"),
    WantedBind("activityparty", "partyid", "lead", "activity party"),
    WantedBind("activitymimeattachment", "objectid", "email", "attachment of email"),
    WantedBind("contact", "ownerid", "systemuser", "owner of auto-created contact"),
    WantedBind("queueitem", "objectid", "email", "queue item of tracked email"),
    WantedBind("queueitem", "queueid", "queue", "queue of a queue item"),
)

# Tables whose ManyToOne relationships the router reads (entity set names are read for every table).
RELATIONSHIP_TABLES: Final[tuple[str, ...]] = ("email", "activityparty", "activitymimeattachment", "contact",
                                               "queueitem")

# The documented names (powerapps-docs entity reference, emulators/dataverse/reference/tables/*.json): used until
# the org's own metadata has been read, and by unit tests. Nothing here is assumed once the org has answered.
_DOCUMENTED_SETS: Final[Mapping[str, str]] = MappingProxyType({
    "systemuser": "systemusers", "queue": "queues", "contact": "contacts", "account": "accounts", "lead": "leads",
    "team": "teams", "businessunit": "businessunits", "email": "emails", "mailbox": "mailboxes",
    "incident": "incidents", "opportunity": "opportunities", "activityparty": "activityparties",
    "activitymimeattachment": "activitymimeattachments", "organization": "organizations",
    "usersettings": "usersettingscollection", "queueitem": "queueitems", "equipment": "equipments",
})


def _documented_relationships() -> dict[str, tuple[Relationship, ...]]:
    email = [
        Relationship("owner_emails", "ownerid", "owner", "ownerid_email"),
        Relationship("mailbox_email_ReceivingMailboxId", "receivingmailboxid", "mailbox", "ReceivingMailboxId_Email"),
        Relationship("email_email_parentactivityid", "parentactivityid", "email", "parentactivityid"),
        Relationship("email_email_CorrelatedActivityId", "correlatedactivityid", "email", "CorrelatedActivityId_Email"),
        Relationship("email_acceptingentity_queue", "acceptingentityid", "queue", "acceptingentityid"),
        Relationship("email_acceptingentity_systemuser", "acceptingentityid", "systemuser", "acceptingentityid"),
    ] + [Relationship(f"{t.capitalize()}_Emails", "regardingobjectid", t, f"regardingobjectid_{t}_email")
         for t in ("account", "contact", "lead", "opportunity", "incident")]
    party = [Relationship(f"{t}_activity_parties", "partyid", t, f"partyid_{t}")
             for t in ("account", "contact", "lead", "queue", "systemuser")]
    return {
        "email": tuple(email),
        "activityparty": tuple(party),
        "activitymimeattachment": (
            Relationship("email_activity_mime_attachment", "objectid", "email", "objectid_email"),),
        "contact": (Relationship("owner_contacts", "ownerid", "owner", "ownerid"),),
        "queueitem": (Relationship("Email_QueueItem", "objectid", "email", "objectid_email"),
                      Relationship("queue_entries", "queueid", "queue", "queueid")),
    }


@dataclass(frozen=True)
class OrgSchema:
    """Entity set names and ManyToOne relationships of the tables the router writes, as the org declares them."""

    entity_sets: Mapping[str, str] = field(default_factory=lambda: _DOCUMENTED_SETS)
    relationships: Mapping[str, tuple[Relationship, ...]] = field(default_factory=_documented_relationships)
    optimistic_concurrency: Mapping[str, bool] = field(default_factory=lambda: {"email": True})
    from_org: bool = False  # False: the documented defaults (metadata not read yet)
    # The org's email-enabled tables (IsActivityParty) with their email columns; () = not read (the router then
    # resolves addresses in the documented five: systemuser, queue, contact, account, lead).
    email_enabled: tuple[EmailEnabledTable, ...] = ()

    @classmethod
    def documented(cls) -> OrgSchema:
        return cls()

    # -- names -------------------------------------------------------------------------------------------------

    def entity_set(self, table: str) -> str | None:
        return self.entity_sets.get(table)

    def bind_path(self, table: str, record_id: uuid.UUID | str) -> str | None:
        entity_set = self.entity_set(table)
        return None if entity_set is None else f"/{entity_set}({record_id})"

    def nav(self, entity: str, attribute: str, target: str) -> str | None:
        """The navigation property to bind ``entity.attribute`` to a ``target`` row, or None when the org declares
        none - or declares one name for several targets of this column (``acceptingentityid`` for queue AND
        systemuser: a CSDL holds one property of that name, typed by one target, so binding the other is a guess)."""
        rels = [r for r in self.relationships.get(entity, ()) if r.referencing_attribute == attribute]
        owner_target = target in ("systemuser", "team")
        matching = [r for r in rels
                    if r.referenced_entity == target or (owner_target and r.referenced_entity == "owner")]
        if len(matching) != 1:
            return None
        name = matching[0].navigation_property
        if any(r.navigation_property == name and r is not matching[0] for r in rels):
            return None
        return name

    def missing(self, wanted: Iterable[WantedBind] = BINDS, *, include_optional: bool = False) -> list[WantedBind]:
        return [w for w in wanted if (include_optional or not w.optional)
                and self.nav(w.entity, w.attribute, w.target) is None]

    def concurrency_enabled(self, table: str) -> bool | None:
        return self.optimistic_concurrency.get(table)


DOCUMENTED: Final = OrgSchema.documented()
