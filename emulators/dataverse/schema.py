"""Entity definitions of the emulated Dataverse tables: columns, types, read-only flags and navigation properties.

The registry is data, not code paths: the store, the OData layer, the metadata endpoints and the validation all read
it, so adding a column is one line here. Column names, types and the read-only flags follow
``reference/dataverse.md`` §2-§4 and ``reference/crm-email-behaviour.md`` §2 and §11.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "ENTITIES",
    "ENTITY_SETS",
    "CollectionNav",
    "Column",
    "EntityDef",
    "entity_by_logical",
    "entity_by_set",
]

# Column types. "lookup" columns are stored as ``_<name>_value`` (+ the target's logical name for annotations).
STRING, MEMO, INT, BOOL, DATETIME, DECIMAL, MONEY, GUID, OPTIONSET, STATE, STATUS, LOOKUP = (
    "string", "memo", "int", "bool", "datetime", "decimal", "money", "guid", "optionset", "state", "status", "lookup",
)
EDM_TYPES: Final = {
    STRING: "Edm.String", MEMO: "Edm.String", INT: "Edm.Int32", BOOL: "Edm.Boolean",
    DATETIME: "Edm.DateTimeOffset", DECIMAL: "Edm.Decimal", MONEY: "Edm.Decimal", GUID: "Edm.Guid",
    OPTIONSET: "Edm.Int32", STATE: "Edm.Int32", STATUS: "Edm.Int32", LOOKUP: "Edm.Guid",
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    max_length: int | None = None
    read_only: bool = False  # IsValidForCreate/Update false in the reference -> strict mode rejects writes
    targets: tuple[str, ...] = ()  # lookup targets (logical names)
    options: dict[int, str] = field(default_factory=dict)  # option labels, also used for FormattedValue
    filterable: bool = True
    min_value: int | None = None
    max_value: int | None = None

    @property
    def value_key(self) -> str:
        """The key the value has in stored rows and in JSON responses (lookups: ``_x_value``)."""
        return f"_{self.name}_value" if self.type == LOOKUP else self.name


@dataclass(frozen=True)
class CollectionNav:
    name: str  # e.g. email_activity_parties
    target: str  # logical name of the child table
    fk: str  # lookup column on the child that points back at the parent


@dataclass
class EntityDef:
    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str
    object_type_code: int
    columns: dict[str, Column]
    collections: dict[str, CollectionNav] = field(default_factory=dict)
    ownership: str = "UserOwned"  # UserOwned | OrganizationOwned | BusinessOwned | None
    creatable: bool = True  # activityparty, usersettings, organization: no Create over the Web API
    state_status: dict[int, tuple[int, tuple[int, ...]]] = field(default_factory=dict)  # state -> (default, allowed)
    readonly_states: tuple[int, ...] = ()  # states in which only statecode/statuscode may change
    metadata_id: str = ""
    # single-valued navigation property name -> (lookup column, allowed target logical names)
    single_navs: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metadata_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-emulator/entity/{self.logical_name}"))
        self.single_navs = _derive_navs(self)

    @property
    def schema_name(self) -> str:
        special = {"activitymimeattachment": "ActivityMimeAttachment", "activityparty": "ActivityParty",
                   "systemuser": "SystemUser", "businessunit": "BusinessUnit", "usersettings": "UserSettings"}
        return special.get(self.logical_name, self.logical_name.capitalize())

    def column_for_key(self, key: str) -> Column | None:
        """Find a column by its JSON key (``subject`` or ``_ownerid_value``)."""
        if key.startswith("_") and key.endswith("_value"):
            col = self.columns.get(key[1:-6])
            return col if col is not None and col.type == LOOKUP else None
        col = self.columns.get(key)
        return col if col is not None and col.type != LOOKUP else None


def _derive_navs(ent: EntityDef) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Single-valued navigation property names for every lookup column.

    Dataverse names them inconsistently across tables (``ownerid``, ``parentcustomerid_account``,
    ``regardingobjectid_contact_email``); the reference says to accept the ``_email`` suffixed and the plain forms
    (§2.3), so we generate: ``<col>`` (any target, type from the bound set), ``<col>_<target>`` and
    ``<col>_<target>_<entity>`` for each target.
    """
    navs: dict[str, tuple[str, tuple[str, ...]]] = {}
    for col in ent.columns.values():
        if col.type != LOOKUP:
            continue
        navs[col.name] = (col.name, col.targets)
        for t in col.targets:
            navs[f"{col.name}_{t}"] = (col.name, (t,))
            navs[f"{col.name}_{t}_{ent.logical_name}"] = (col.name, (t,))
    return navs


def _cols(*cols: Column) -> dict[str, Column]:
    return {c.name: c for c in cols}


def _s(name: str, n: int = 100, ro: bool = False) -> Column:
    return Column(name, STRING, max_length=n, read_only=ro)


def _i(name: str, ro: bool = False, lo: int | None = None, hi: int | None = None) -> Column:
    return Column(name, INT, read_only=ro, min_value=lo, max_value=hi)


def _b(name: str, ro: bool = False) -> Column:
    return Column(name, BOOL, read_only=ro)


def _d(name: str, ro: bool = False) -> Column:
    return Column(name, DATETIME, read_only=ro)


def _o(name: str, options: dict[int, str], ro: bool = False) -> Column:
    return Column(name, OPTIONSET, read_only=ro, options=options)


def _lk(name: str, *targets: str, ro: bool = False) -> Column:
    return Column(name, LOOKUP, read_only=ro, targets=targets)


INCOMING_METHODS: Final = {0: "None", 1: "Microsoft Dynamics 365 for Outlook",
                           2: "Server-Side Synchronization or Email Router", 3: "Forward Mailbox"}
OUTGOING_METHODS: Final = {0: "None", 1: "Microsoft Dynamics 365 for Outlook",
                           2: "Server-Side Synchronization or Email Router"}
APPROVAL: Final = {0: "Empty", 1: "Approved", 2: "Pending Approval", 3: "Rejected"}
FILTERING: Final = {0: "All email messages", 1: "Email messages in response to Dynamics 365 email",
                    2: "Email messages from Dynamics 365 Leads, Contacts and Accounts",
                    3: "Email messages from Dynamics 365 records that are email enabled", 4: "No email messages"}
MAILBOX_STATUS: Final = {0: "Not Run", 1: "Success", 2: "Failure"}
PARTICIPATION: Final = {1: "Sender", 2: "To Recipient", 3: "CC Recipient", 4: "BCC Recipient",
                        5: "Required attendee", 6: "Optional attendee", 7: "Organizer", 8: "Regarding", 9: "Owner",
                        10: "Resource", 11: "Customer", 12: "Chat Participant", 13: "Related"}
EMAIL_STATES: Final = {0: "Open", 1: "Completed", 2: "Canceled"}
EMAIL_STATUSES: Final = {1: "Draft", 2: "Completed", 3: "Sent", 4: "Received", 5: "Canceled", 6: "Pending Send",
                         7: "Sending", 8: "Failed"}
ACTIVE_STATES: Final = {0: "Active", 1: "Inactive"}
ACTIVE_STATUSES: Final = {1: "Active", 2: "Inactive"}

# Columns every table gets (system-maintained, read-only).
_AUDIT = (
    _d("createdon", ro=True), _d("modifiedon", ro=True), _lk("createdby", "systemuser", ro=True),
    _lk("modifiedby", "systemuser", ro=True), _lk("createdonbehalfby", "systemuser", ro=True),
    _lk("modifiedonbehalfby", "systemuser", ro=True), Column("versionnumber", INT, read_only=True),
    _d("overriddencreatedon"),
)
_OWNED = (
    _lk("ownerid", "systemuser", "team"), _lk("owninguser", "systemuser", ro=True),
    _lk("owningteam", "team", ro=True), _lk("owningbusinessunit", "businessunit", ro=True),
)


def _state(states: dict[int, str], statuses: dict[int, str]) -> tuple[Column, Column]:
    return Column("statecode", STATE, options=states), Column("statuscode", STATUS, options=statuses)


_ACTIVE_INACTIVE = {0: (1, (1,)), 1: (2, (2,))}
_REGARDING_TARGETS = ("account", "contact", "lead", "opportunity", "incident", "systemuser", "queue")
_PARTY_TARGETS = ("account", "contact", "lead", "queue", "systemuser", "knowledgearticle", "opportunity", "incident")


def _email() -> EntityDef:
    return EntityDef(
        "email", "emails", "activityid", "subject", 4202,
        _cols(
            Column("activityid", GUID), _s("subject", 800), Column("description", MEMO, 1073741823, filterable=False),
            _b("directioncode"), _s("messageid", 320), _s("sender", 250), _s("torecipients", 500),
            _s("trackingtoken", 50), _lk("parentactivityid", "email"), _s("conversationindex", 2048, ro=True),
            _s("inreplyto", 320, ro=True),
            _o("correlationmethod", {0: "None", 1: "Skipped", 2: "XHeader", 3: "InReplyTo", 4: "TrackingToken",
                                     5: "ConversationIndex", 6: "SmartMatching", 7: "CustomCorrelation"}, ro=True),
            _d("actualend"), _d("actualstart"), _d("scheduledend"), _d("scheduledstart"), _d("senton", ro=True),
            _d("delayedemailsendtime"),
            _i("deliveryattempts", lo=0, hi=1000000000),
            _o("deliveryprioritycode", {0: "Low", 1: "Normal", 2: "High"}),
            _o("prioritycode", {0: "Low", 1: "Normal", 2: "High"}),
            _o("notifications", {0: "None", 1: "The message was saved as a Microsoft Dynamics 365 email record, "
                                     "but not all the attachments could be saved with it.", 2: "Truncated body"}),
            _s("internetmessageheaders", 500), _s("mimetype", 256), _s("submittedby", 250),
            _lk("receivingmailboxid", "mailbox"), _lk("sendermailboxid", "mailbox", ro=True),
            _lk("emailsender", "account", "contact", "queue", "systemuser", "lead", ro=True),
            _lk("regardingobjectid", *_REGARDING_TARGETS), _lk("acceptingentityid", "queue", "systemuser"),
            _lk("correlatedactivityid", "email", ro=True), _b("isduplicatesenderunresolved", ro=True),
            _b("readreceiptrequested"), _b("deliveryreceiptrequested"), _i("attachmentcount", ro=True),
            _s("safedescription", 1073741823, ro=True), _i("baseconversationindexhash", ro=True),
            _s("activitytypecode", 64, ro=True), _s("category", 250), _s("subcategory", 250),
            *_state(EMAIL_STATES, EMAIL_STATUSES), *_OWNED, *_AUDIT,
        ),
        collections={
            "email_activity_parties": CollectionNav("email_activity_parties", "activityparty", "activityid"),
            "email_activity_mime_attachment": CollectionNav(
                "email_activity_mime_attachment", "activitymimeattachment", "objectid"),
            "activity_pointer_activity_mime_attachment": CollectionNav(
                "activity_pointer_activity_mime_attachment", "activitymimeattachment", "objectid"),
        },
        # dataverse.md §2.4: Pending Send (6) and Sending (7) are Completed-state statuses.
        state_status={0: (1, (1, 8)), 1: (2, (2, 3, 4, 6, 7)), 2: (5, (5,))},
        readonly_states=(1, 2),
    )


def _activityparty() -> EntityDef:
    return EntityDef(
        "activityparty", "activityparties", "activitypartyid", "partyidname", 135,
        _cols(
            Column("activitypartyid", GUID), _lk("activityid", "email"), _lk("partyid", *_PARTY_TARGETS),
            _o("participationtypemask", PARTICIPATION), _s("addressused", 320), _s("unresolvedpartyname", 200),
            Column("effort", DECIMAL), _s("exchangeentryid", 1024), _i("addressusedemailcolumnnumber", ro=True),
            _b("donotemail", ro=True), _b("donotfax", ro=True), _b("donotphone", ro=True),
            _b("donotpostalmail", ro=True), _b("ispartydeleted", ro=True), _i("instancetypecode", ro=True),
            _lk("ownerid", "systemuser", "team", ro=True), _d("scheduledstart", ro=True), _d("scheduledend", ro=True),
            Column("versionnumber", INT, read_only=True),
        ),
        ownership="None", creatable=False,
    )


def _attachment() -> EntityDef:
    return EntityDef(
        "activitymimeattachment", "activitymimeattachments", "activitymimeattachmentid", "filename", 1001,
        _cols(
            Column("activitymimeattachmentid", GUID), Column("body", MEMO, 1073741823, filterable=False),
            _s("filename", 255), _s("mimetype", 256), _lk("objectid", "email"), _s("objecttypecode", 64),
            _s("subject", 2000), _s("attachmentcontentid", 250), Column("attachmentid", GUID),
            _i("attachmentnumber"), _lk("activityid", "email", ro=True), _i("filesize", ro=True),
            _b("isfollowed", ro=True), _i("componentstate", ro=True),
            _lk("ownerid", "systemuser", "team", ro=True), *_AUDIT,
        ),
        ownership="UserOwned",
    )


def _person(logical: str, set_name: str, pk: str, otc: int, *extra: Column) -> EntityDef:
    return EntityDef(
        logical, set_name, pk, "fullname", otc,
        _cols(
            Column(pk, GUID), _s("firstname", 50), _s("lastname", 50), _s("fullname", 160, ro=True),
            _s("emailaddress1"), _s("emailaddress2"), _s("emailaddress3"), _s("telephone1", 50),
            _b("donotemail"), *extra, *_OWNED, *_AUDIT,
        ),
    )


def _contact() -> EntityDef:
    e = _person("contact", "contacts", "contactid", 2, _s("jobtitle", 100),
                _lk("parentcustomerid", "account", "contact"), *_state(ACTIVE_STATES, ACTIVE_STATUSES))
    e.state_status = dict(_ACTIVE_INACTIVE)
    return e


def _lead() -> EntityDef:
    e = _person("lead", "leads", "leadid", 4, _s("subject", 300), _s("companyname", 100),
                *_state({0: "Open", 1: "Qualified", 2: "Disqualified"},
                        {1: "New", 2: "Contacted", 3: "Qualified", 4: "Lost", 5: "Cannot Contact",
                         6: "No Longer Interested", 7: "Canceled"}))
    e.state_status = {0: (1, (1, 2)), 1: (3, (3,)), 2: (4, (4, 5, 6, 7))}
    return e


def _account() -> EntityDef:
    return EntityDef(
        "account", "accounts", "accountid", "name", 1,
        _cols(
            Column("accountid", GUID), _s("name", 160), _s("accountnumber", 20), _s("emailaddress1"),
            _s("emailaddress2"), _s("emailaddress3"), _s("telephone1", 50), _b("donotemail"),
            _lk("primarycontactid", "contact"), _lk("parentaccountid", "account"),
            *_state(ACTIVE_STATES, ACTIVE_STATUSES), *_OWNED, *_AUDIT,
        ),
        state_status=dict(_ACTIVE_INACTIVE),
    )


def _systemuser() -> EntityDef:
    return EntityDef(
        "systemuser", "systemusers", "systemuserid", "fullname", 8,
        _cols(
            Column("systemuserid", GUID), _s("firstname", 64), _s("lastname", 64), _s("fullname", 200, ro=True),
            _s("domainname", 1024), _s("internalemailaddress"), _s("personalemailaddress"),
            Column("azureactivedirectoryobjectid", GUID), Column("applicationid", GUID), _b("isdisabled"),
            _o("accessmode", {0: "Read-Write", 1: "Administrative", 2: "Read", 3: "Support User",
                              4: "Non-interactive", 5: "Delegated Admin"}),
            _o("incomingemaildeliverymethod", INCOMING_METHODS), _o("outgoingemaildeliverymethod", OUTGOING_METHODS),
            _o("emailrouteraccessapproval", APPROVAL), _b("isemailaddressapprovedbyo365admin"),
            _lk("defaultmailbox", "mailbox", ro=True), _lk("businessunitid", "businessunit"),
            _lk("queueid", "queue", ro=True), _s("title", 128), _b("islicensed"),
            _lk("owningbusinessunit", "businessunit", ro=True), *_AUDIT,
        ),
        ownership="BusinessOwned",
    )


def _queue() -> EntityDef:
    return EntityDef(
        "queue", "queues", "queueid", "name", 2020,
        _cols(
            Column("queueid", GUID), _s("name", 400), _s("emailaddress"),
            _o("incomingemaildeliverymethod", {0: "None", 2: "Server-Side Synchronization or Email Router",
                                               3: "Forward Mailbox"}),
            _o("outgoingemaildeliverymethod", {0: "None", 2: "Server-Side Synchronization or Email Router"}),
            _o("incomingemailfilteringmethod", FILTERING), _o("emailrouteraccessapproval", APPROVAL),
            _b("isemailaddressapprovedbyo365admin"), _lk("defaultmailbox", "mailbox", ro=True),
            _o("queueviewtype", {0: "Public", 1: "Private"}), _lk("businessunitid", "businessunit"),
            *_state(ACTIVE_STATES, ACTIVE_STATUSES), *_OWNED, *_AUDIT,
        ),
        state_status=dict(_ACTIVE_INACTIVE),
    )


def _mailbox() -> EntityDef:
    return EntityDef(
        "mailbox", "mailboxes", "mailboxid", "name", 9606,
        _cols(
            Column("mailboxid", GUID), _s("name", 256), _s("emailaddress"),
            _lk("regardingobjectid", "queue", "systemuser"),
            _o("incomingemaildeliverymethod", INCOMING_METHODS), _o("outgoingemaildeliverymethod", OUTGOING_METHODS),
            _o("actdeliverymethod", {0: "Microsoft Dynamics 365 for Outlook", 1: "Server-Side Synchronization",
                                     2: "None"}),
            _o("incomingemailstatus", MAILBOX_STATUS), _o("outgoingemailstatus", MAILBOX_STATUS),
            _o("actstatus", MAILBOX_STATUS), _o("mailboxstatus", MAILBOX_STATUS),
            _o("emailrouteraccessapproval", APPROVAL), _b("isemailaddressapprovedbyo365admin"),
            _b("enabledforincomingemail"), _b("enabledforoutgoingemail"), _b("enabledforact"),
            _d("processemailreceivedafter"), _b("processanddeleteemails"), _b("isforwardmailbox"),
            _s("lastsyncerror", 4000), _i("lastsyncerrorcode"), _d("lastsyncerroroccurredon"),
            _d("lastsuccessfulsynccompletedon"), _i("transientfailurecount"), _i("itemsprocessedforlastsync"),
            _i("itemsfailedforlastsync"), _b("testemailconfigurationscheduled"), _i("testemailconfigurationretrycount"),
            _d("testmailboxaccesscompletedon"), _lk("emailserverprofile", "emailserverprofile"),
            *_state(ACTIVE_STATES, ACTIVE_STATUSES), *_OWNED, *_AUDIT,
        ),
        state_status=dict(_ACTIVE_INACTIVE),
    )


def _usersettings() -> EntityDef:
    return EntityDef(
        "usersettings", "usersettingscollection", "systemuserid", "systemuserid", 150,
        _cols(
            Column("systemuserid", GUID), _o("incomingemailfilteringmethod", FILTERING), _i("timezonecode"),
            _i("uilanguageid"), _i("localeid"), _lk("businessunitid", "businessunit", ro=True),
            _d("createdon", ro=True), _d("modifiedon", ro=True), Column("versionnumber", INT, read_only=True),
        ),
        ownership="None", creatable=False,
    )


def _organization() -> EntityDef:
    return EntityDef(
        "organization", "organizations", "organizationid", "name", 1019,
        _cols(
            Column("organizationid", GUID), _s("name", 160), _i("maxuploadfilesize", lo=0, hi=131072000),
            _b("allowunresolvedpartiesonemailsend"), _b("ignoreinternalemail"), _b("emailcorrelationenabled"),
            _b("enablesmartmatching"), _i("hashdeltasubjectcount"), _s("hashfilterkeywords", 1073741823),
            _i("hashmaxcount"), _i("hashminaddresscount"), _i("maximumtrackingnumber"), _s("trackingprefix", 256),
            _i("trackingtokenidbase"), _i("trackingtokeniddigits", lo=1, hi=10), _b("requireapprovalforuseremail"),
            _b("requireapprovalforqueueemail"), _i("emailsendpollingperiod"),
            _b("unresolveemailaddressifmultiplematch"), _b("rendersecureiframeforemail"),
            _i("nexttrackingnumber", ro=True), _s("defaultemailsettings", 1073741823),
            _lk("basecurrencyid", "transactioncurrency", ro=True),
            _d("createdon", ro=True), _d("modifiedon", ro=True), Column("versionnumber", INT, read_only=True),
        ),
        ownership="OrganizationOwned", creatable=False,
    )


def _simple(logical: str, set_name: str, pk: str, name_col: str, otc: int, *extra: Column,
            states: bool = True, ownership: str = "UserOwned") -> EntityDef:
    cols = [Column(pk, GUID), _s(name_col, 300), *extra]
    if states:
        cols += [*_state(ACTIVE_STATES, ACTIVE_STATUSES)]
    if ownership == "UserOwned":
        cols += list(_OWNED)
    return EntityDef(logical, set_name, pk, name_col, otc, _cols(*cols, *_AUDIT), ownership=ownership,
                     state_status=dict(_ACTIVE_INACTIVE) if states else {})


def _all() -> list[EntityDef]:
    opp = _simple("opportunity", "opportunities", "opportunityid", "name", 3,
                  _lk("customerid", "account", "contact"), _lk("parentcontactid", "contact"),
                  _lk("parentaccountid", "account"))
    opp.columns["statecode"] = Column("statecode", STATE, options={0: "Open", 1: "Won", 2: "Lost"})
    opp.columns["statuscode"] = Column("statuscode", STATUS, options={1: "In Progress", 2: "On Hold", 3: "Won",
                                                                       4: "Canceled", 5: "Out-Sold"})
    opp.state_status = {0: (1, (1, 2)), 1: (3, (3,)), 2: (4, (4, 5))}
    inc = _simple("incident", "incidents", "incidentid", "title", 112,
                  _lk("customerid", "account", "contact"), _s("ticketnumber", 100))
    inc.columns["statecode"] = Column("statecode", STATE, options={0: "Active", 1: "Resolved", 2: "Canceled"})
    inc.columns["statuscode"] = Column("statuscode", STATUS, options={1: "In Progress", 2: "On Hold",
                                                                       5: "Problem Solved", 6: "Canceled"})
    inc.state_status = {0: (1, (1, 2)), 1: (5, (5,)), 2: (6, (6,))}
    bu = _simple("businessunit", "businessunits", "businessunitid", "name", 10,
                 _lk("parentbusinessunitid", "businessunit"), states=False, ownership="BusinessOwned")
    team = _simple("team", "teams", "teamid", "name", 9, _lk("businessunitid", "businessunit"),
                   _o("teamtype", {0: "Owner", 1: "Access", 2: "Security Group", 3: "Office Group"}),
                   states=False, ownership="BusinessOwned")
    return [_email(), _activityparty(), _attachment(), _contact(), _account(), _lead(), _systemuser(), _queue(),
            _mailbox(), _usersettings(), _organization(), opp, inc, bu, team]


ENTITIES: Final[dict[str, EntityDef]] = {e.logical_name: e for e in _all()}
ENTITY_SETS: Final[dict[str, EntityDef]] = {e.entity_set: e for e in ENTITIES.values()}


def entity_by_set(name: str) -> EntityDef | None:
    """Entity sets are case-sensitive in Dataverse (``Accounts`` -> 404), so is this lookup."""
    return ENTITY_SETS.get(name)


def entity_by_logical(name: str) -> EntityDef | None:
    return ENTITIES.get(name)
