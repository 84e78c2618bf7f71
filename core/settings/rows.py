"""Pure parsing, validation and merging of the settings tables' rows (no I/O).

Mailbox rows (table ``<prefix>Mailboxes``, PartitionKey ``mailbox``, RowKey = the lower-cased address, key-encoded)
hold two columns per setting: ``Crm<Field>`` written by the CRM sync and ``Override<Field>`` written by admins (or
``emailrouter mailbox set``). The effective value is the override when present, else the CRM value, else the
default — so an override wins over CRM and survives every sync (the sync only ever writes ``Crm*`` columns).

Org rows (table ``<prefix>OrgSettings``, PartitionKey ``org``, RowKey = the key) work the same way with ``CrmValue``
(organization columns copied by the sync) and ``Value`` (admin). They map onto ``OrgEmailSettings`` (read by the
pipelines' pure decisions) and :class:`RouterSettings` (router-only knobs).

An invalid value never crashes anything: a mailbox row with a bad value is reported as a :class:`RowError` naming
every reason and is ignored; the caller (the cached directory) keeps the last good configuration in force. A bad
org value falls back to the previous good value of that key, else its default.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any, Final, Literal, TypeVar

from core.adapters.storage import decode_key, encode_key
from core.domain.model import (
    ApprovalStatus,
    CrmRecordRef,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    OrgEmailSettings,
    OutboundMethod,
    QueueOwnerFallback,
    SssStatus,
    TrackingFilter,
    WrapperTrustPolicy,
)

__all__ = [
    "FIELDS",
    "MAILBOX_PARTITION",
    "ORG_KEYS",
    "ORG_PARTITION",
    "STATE_COLUMNS",
    "EffectiveValue",
    "FieldSpec",
    "OrgKey",
    "OrgParseResult",
    "RouterSettings",
    "RowError",
    "crm_column",
    "effective_fields",
    "format_org_value",
    "format_value",
    "normalise_address",
    "org_defaults",
    "org_key",
    "override_column",
    "parse_mailbox_row",
    "parse_org_rows",
    "parse_override_changes",
    "row_key",
]

MAILBOX_PARTITION: Final = "mailbox"
ORG_PARTITION: Final = "org"

# Columns the CRM sync maintains besides Crm<Field> (state of the row, not settings).
STATE_COLUMNS: Final = ("Address", "CrmDisabled", "RemovedFromCrm", "RemovedOn", "CrmSyncedOn")

_ADDRESS_RE: Final = re.compile(r"^[^@\s<>()\[\],;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$")

_E = TypeVar("_E", bound=Enum)


# ------------------------------------------------------------------------------------------------ value parsers


def normalise_address(value: object) -> str:
    """A lower-cased, trimmed SMTP address; ValueError when it is not one."""
    text = str(value or "").strip().lower()
    if not _ADDRESS_RE.match(text) or len(text) > 320:
        raise ValueError(f"{value!r} is not an email address")
    return text


def row_key(address: str) -> str:
    """The mailbox row's RowKey: lower-cased address, key-encoded (``/``, ``#``, ``?``, ``\\`` are legal in addresses
    but not in keys)."""
    return encode_key(address.strip().lower())


def _enum_parser(enum: type[_E], aliases: Mapping[str, _E]) -> Callable[[object], _E]:
    """Accept the CRM number, the canonical lower-case name, or a documented alias."""

    def parse(value: object) -> _E:
        if isinstance(value, enum):
            return value
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not one of {_choices(enum, aliases)}")
        if isinstance(value, int):
            try:
                return enum(value)
            except ValueError:
                raise ValueError(f"{value!r} is not one of {_choices(enum, aliases)}") from None
        text = str(value).strip().lower().replace("-", "_").replace(" ", "_")
        if text.lstrip("-").isdigit():
            return parse(int(text))
        if text in aliases:
            return aliases[text]
        for member in enum:
            if member.name.lower() == text:
                return member
        raise ValueError(f"{value!r} is not one of {_choices(enum, aliases)}")

    return parse


def _choices(enum: type[Enum], aliases: Mapping[str, Enum]) -> str:
    names = [m.name.lower() for m in enum]
    return ", ".join(names + sorted(a for a in aliases if a not in names))


parse_inbound = _enum_parser(InboundMethod, {"router": InboundMethod.INDIVIDUAL, "sss": InboundMethod.INDIVIDUAL,
                                              "mailbox": InboundMethod.INDIVIDUAL})
parse_outbound = _enum_parser(OutboundMethod, {"sss": OutboundMethod.ROUTER})
parse_filter = _enum_parser(TrackingFilter, {
    "replies": TrackingFilter.REPLIES_TO_CRM_EMAIL,
    "contacts": TrackingFilter.FROM_LEADS_CONTACTS_ACCOUNTS,
    "leads_contacts_accounts": TrackingFilter.FROM_LEADS_CONTACTS_ACCOUNTS,
    "email_enabled": TrackingFilter.FROM_EMAIL_ENABLED_RECORDS,
    "records": TrackingFilter.FROM_EMAIL_ENABLED_RECORDS,
})
parse_approval = _enum_parser(ApprovalStatus, {"pending_approval": ApprovalStatus.PENDING})
parse_sss = _enum_parser(SssStatus, {"": SssStatus.NONE, "off": SssStatus.NONE})
parse_kind = _enum_parser(MailboxKind, {"sink": MailboxKind.FORWARD_SINK, "forward": MailboxKind.FORWARD_SINK,
                                        "systemuser": MailboxKind.USER})


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on", "y"):
        return True
    if text in ("false", "no", "0", "off", "n"):
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false)")


def parse_guid(value: object) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value).strip().strip("{}"))
    except ValueError:
        raise ValueError(f"{value!r} is not a GUID") from None


def parse_datetime(value: object) -> datetime:
    """An ISO 8601 date or date-time; naive values are UTC (Dataverse DateOnly columns arrive as a plain date)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    text = str(value).strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _parse_ref(value: object) -> CrmRecordRef:
    """``"account:<guid>"`` or ``{"table": "account", "id": "<guid>"}``."""
    if isinstance(value, Mapping):
        table, rid = value.get("table"), value.get("id")
    else:
        table, _, rid = str(value).partition(":")
    if not table or not str(table).strip().isidentifier():
        raise ValueError(f"{value!r}: give the record as \"<table>:<guid>\", e.g. \"account:1f0e...\"")
    return CrmRecordRef(str(table).strip().lower(), parse_guid(rid))


def parse_folders(value: object) -> dict[str, CrmRecordRef]:
    """Tracked folders (folder-level tracking, crm-ref §5.3): JSON object folder name/id -> record."""
    data = value
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            data = json.loads(value)
        except ValueError:
            raise ValueError("tracked folders must be a JSON object {\"Folder\": \"account:<guid>\"}") from None
    if not isinstance(data, Mapping):
        raise ValueError("tracked folders must be a JSON object {\"Folder\": \"account:<guid>\"}")
    if len(data) > 25:  # SSS allows at most 25 folder mappings per user (crm-ref §5.3)
        raise ValueError(f"{len(data)} tracked folders; at most 25 are allowed")
    return {str(k): _parse_ref(v) for k, v in data.items()}


def parse_text(value: object) -> str:
    return str(value).strip()


def parse_optional_address(value: object) -> str:
    return normalise_address(value)


def parse_graph_user(value: object) -> str:
    """An Entra object id (GUID) or a user principal name: the two keys of ``/users/{id | userPrincipalName}``."""
    text = str(value).strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        pass
    if "@" in text and not any(c.isspace() or c in "/?#" for c in text):
        return text.lower()
    raise ValueError(f"{text!r} is neither an object id (GUID) nor a user principal name")


# ------------------------------------------------------------------------------------------------ mailbox fields


@dataclass(frozen=True)
class FieldSpec:
    """One mailbox setting: ``Crm<name>`` (when ``crm``) and ``Override<name>`` columns."""

    name: str
    parse: Callable[[object], Any]
    crm: bool
    help: str
    cli: str = ""  # the `emailrouter mailbox set` option, when it has one


FIELDS: Final[tuple[FieldSpec, ...]] = (
    FieldSpec("Kind", parse_kind, True, "user | queue | forward_sink"),
    FieldSpec("OwnerId", parse_guid, True, "systemuserid or queueid of the owner (empty for forward sinks)"),
    FieldSpec("MailboxId", parse_guid, True, "CRM mailbox record id (health is written back to it)"),
    FieldSpec("QueueOwnerId", parse_guid, True, "ownerid of a queue (owner fallback)"),
    FieldSpec("Inbound", parse_inbound, True, "none | outlook | individual | forward", "--inbound"),
    FieldSpec("Outbound", parse_outbound, True, "none | outlook | router", "--outbound"),
    FieldSpec("Filter", parse_filter, True,
              "all | replies | contacts | email_enabled | none (incomingemailfilteringmethod 0-4)", "--filter"),
    FieldSpec("ForwardSink", parse_optional_address, True, "sink address a forward user's rule forwards to", "--sink"),
    FieldSpec("Approval", parse_approval, True, "empty | approved | pending | rejected", "--approval"),
    FieldSpec("EnabledIncoming", parse_bool, True, "enabledforincomingemail", "--enabled-incoming"),
    FieldSpec("EnabledOutgoing", parse_bool, True, "enabledforoutgoingemail", "--enabled-outgoing"),
    FieldSpec("DeleteAfterProcessing", parse_bool, True, "processanddeleteemails (sinks and queues)",
              "--delete-after-processing"),
    FieldSpec("ProcessEmailFrom", parse_datetime, True, "processemailreceivedafter (ISO date)", "--process-from"),
    FieldSpec("TrackSentItems", parse_bool, False, "also track the Sent Items folder", "--track-sent-items"),
    FieldSpec("AutoCreateContacts", parse_bool, False, "create contacts for unknown senders",
              "--auto-create-contacts"),
    FieldSpec("TrackedFolders", parse_folders, False, "JSON {folder: \"table:guid\"} (folder-level tracking)",
              "--folders"),
    FieldSpec("Enabled", parse_bool, False, "router master switch for this mailbox (false = ignore it)",
              "--enabled"),
    FieldSpec("GraphUserId", parse_graph_user, True,
              "Entra object id (or UPN) the router addresses the mailbox by in Graph; resolved from the address at "
              "CRM sync (User.Read.All)", "--graph-user-id"),
    FieldSpec("SssIncoming", parse_sss, True,
              "Server-Side Sync on incoming mail: none | configured | active (email server profile + status)",
              "--sss-incoming"),
    FieldSpec("SssOutgoing", parse_sss, True,
              "Server-Side Sync on outgoing mail: none | configured | active; active = the router does not send",
              "--sss-outgoing"),
)
_BY_NAME: Final[Mapping[str, FieldSpec]] = {f.name.lower(): f for f in FIELDS}


def crm_column(name: str) -> str:
    return f"Crm{name}"


def override_column(name: str) -> str:
    return f"Override{name}"


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def format_value(value: object) -> Any:
    """The canonical table representation of a parsed value (enum names, ISO dates, JSON for folders)."""
    if isinstance(value, Enum):
        return value.name.lower()
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return json.dumps({k: f"{r.table}:{r.id}" for k, r in value.items()}, sort_keys=True)
    return value


@dataclass(frozen=True)
class EffectiveValue:
    value: Any
    source: Literal["override", "crm", "default"]
    raw: Any = None


@dataclass(frozen=True)
class RowError:
    """A row the router ignores, with every reason (shown by ``emailrouter mailbox list`` and logged)."""

    row_key: str
    address: str
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.address or self.row_key}: " + "; ".join(self.reasons)


def effective_fields(entity: Mapping[str, Any]) -> tuple[dict[str, EffectiveValue], list[str]]:
    """Per field the winning value and where it came from; plus one reason per invalid value."""
    values: dict[str, EffectiveValue] = {}
    reasons: list[str] = []
    for spec in FIELDS:
        for source, column in (("override", override_column(spec.name)), ("crm", crm_column(spec.name))):
            if source == "crm" and not spec.crm:
                continue
            raw = entity.get(column)
            if not _present(raw):
                continue
            try:
                values[spec.name] = EffectiveValue(spec.parse(raw), source, raw)  # type: ignore[arg-type]
            except ValueError as exc:
                reasons.append(f"{column}: {exc}")
            break  # the override decides even when invalid: never fall back silently to CRM
    return values, reasons


def parse_mailbox_row(entity: Mapping[str, Any], router: RouterSettings | None = None) -> MailboxConfig | RowError:
    """A settings row -> the effective :class:`MailboxConfig`, or a :class:`RowError` with every reason."""
    router = router or RouterSettings()
    key = str(entity.get("RowKey", ""))
    reasons: list[str] = []
    try:
        address = normalise_address(entity.get("Address") or decode_key(key))
    except ValueError as exc:
        return RowError(key, str(entity.get("Address") or ""), (f"Address: {exc}",))
    if row_key(address) != key:
        reasons.append(f"RowKey {key!r} does not match Address {address!r} (expected {row_key(address)!r})")
    values, bad = effective_fields(entity)
    reasons.extend(bad)

    def get(name: str, default: Any) -> Any:
        hit = values.get(name)
        return default if hit is None else hit.value

    kind: MailboxKind = get("Kind", MailboxKind.USER)
    owner_id: uuid.UUID | None = get("OwnerId", None)
    owner: CrmRecordRef | None = None
    if kind is MailboxKind.FORWARD_SINK:
        owner = None
    elif owner_id is None:
        column = "queueid" if kind is MailboxKind.QUEUE else "systemuserid"
        reasons.append(f"Kind {kind.value} needs OwnerId (the {column})")
    else:
        owner = CrmRecordRef("queue" if kind is MailboxKind.QUEUE else "systemuser", owner_id)
    inbound: InboundMethod = get("Inbound", InboundMethod.NONE)
    outbound: OutboundMethod = get("Outbound", OutboundMethod.NONE)
    if kind is MailboxKind.FORWARD_SINK:
        # A sink exists only to be read directly by the router, and sends nothing (crm-ref §3: outgoing None).
        inbound, outbound = InboundMethod.INDIVIDUAL, OutboundMethod.NONE
    if kind is MailboxKind.QUEUE and inbound is InboundMethod.OUTLOOK:
        reasons.append("Inbound: queues have no Outlook incoming method (crm-ref §2.2)")
    sink: str | None = get("ForwardSink", None) or (router.default_forward_sink or None)
    if kind is not MailboxKind.FORWARD_SINK and inbound is InboundMethod.FORWARD and sink == address:
        reasons.append("ForwardSink: a forward user cannot forward to itself")
    if reasons:
        return RowError(key, address, tuple(reasons))

    default_filter = TrackingFilter.ALL if kind is not MailboxKind.USER else TrackingFilter.REPLIES_TO_CRM_EMAIL
    enabled = (get("Enabled", True) and not _flag(entity.get("RemovedFromCrm"))
               and not _flag(entity.get("CrmDisabled")))
    queue_owner_id: uuid.UUID | None = get("QueueOwnerId", None)
    return MailboxConfig(
        address=address,
        kind=kind,
        owner=owner,
        mailbox_id=get("MailboxId", None),
        inbound_method=inbound,
        outbound_method=outbound,
        tracking_filter=get("Filter", default_filter),
        track_sent_items=get("TrackSentItems", router.track_sent_items_default),
        folder_regarding=get("TrackedFolders", {}),
        auto_create_contacts=get("AutoCreateContacts", False),
        process_email_received_after=get("ProcessEmailFrom", None),
        forward_sink_address=sink if inbound is InboundMethod.FORWARD and kind is not MailboxKind.FORWARD_SINK
        else None,
        delete_after_processing=get(
            "DeleteAfterProcessing",
            router.delete_after_processing_for_sinks if kind is MailboxKind.FORWARD_SINK else False),
        enabled_for_incoming=enabled and get("EnabledIncoming", True),
        enabled_for_outgoing=enabled and get("EnabledOutgoing", True),
        approval=get("Approval", ApprovalStatus.EMPTY),
        queue_owner=CrmRecordRef("systemuser", queue_owner_id) if queue_owner_id and kind is MailboxKind.QUEUE
        else None,
        graph_user_id=get("GraphUserId", None),
        sss_incoming=get("SssIncoming", SssStatus.NONE),
        sss_outgoing=get("SssOutgoing", SssStatus.NONE),
    )


def _flag(value: object) -> bool:
    try:
        return _present(value) and parse_bool(value)
    except ValueError:
        return True  # an unreadable state flag: treat as set (disabled), never as silently enabled


def parse_override_changes(changes: Mapping[str, object | None]) -> dict[str, Any]:
    """CLI/admin input ``{"Inbound": "forward", "Filter": None, ...}`` -> the ``Override*`` columns to write.

    ``None`` or ``""`` clears the override (the CRM value applies again). Field names are case-insensitive.
    Raises ``ValueError`` naming every bad value, before anything is written.
    """
    out: dict[str, Any] = {}
    errors: list[str] = []
    for name, value in changes.items():
        spec = _BY_NAME.get(name.lower().removeprefix("override"))
        if spec is None:
            errors.append(f"unknown setting {name!r} (known: {', '.join(f.name for f in FIELDS)})")
            continue
        if not _present(value):
            out[override_column(spec.name)] = ""
            continue
        try:
            out[override_column(spec.name)] = format_value(spec.parse(value))
        except ValueError as exc:
            errors.append(f"{spec.name}: {exc}")
    if errors:
        raise ValueError("; ".join(errors))
    return out


# ------------------------------------------------------------------------------------------------ org settings


@dataclass(frozen=True)
class RouterSettings:
    """Router-only knobs (org settings table). Who honours each one is in docs/admin-guide.md."""

    # Off by default: tagging costs one Graph call per tracked email (target <= 1.2 Graph calls per email);
    # set it to e.g. "Tracked to Dynamics 365" to show users what was tracked, as SSS does.
    tracked_category: str = ""
    undeliverable_category: str = "Undeliverable"
    save_to_sent_items: bool = True
    outbound_max_attempts: int = 5
    outbound_reaper_timeout_seconds: int = 900
    crm_sync_interval_minutes: int = 15
    delete_after_processing_for_sinks: bool = False
    default_forward_sink: str = ""
    track_sent_items_default: bool = False
    health_probe_interval_minutes: int = 15
    health_max_backoff_minutes: int = 240
    # A mailbox waiting for its first subscription is "pending", not "failing", for at most this long.
    health_pending_minutes: int = 30
    # Forward mailboxes (sinks): where processed wrappers (tracked or not) go when they are not deleted, and where
    # wrappers that cannot be delivered into CRM go; "" leaves them in the Inbox. Child folders of the Inbox.
    processed_folder: str = "Processed"
    undeliverable_folder: str = "Undeliverable"
    processed_wrapper_days: int = 30  # wrappers in the processed folder older than this are deleted; 0 = keep
    retention_days: int = 30  # decision records, their index, outbound index rows, processed-ledger rows
    retention_interval_minutes: int = 60  # the delta catch-up timer runs the retention clean-up this often
    alert_sender: str = ""
    alert_recipients: tuple[str, ...] = ()
    # CRM's Test & Enable (mailbox.testemailconfigurationscheduled) answered by the router for its mailboxes without
    # an email server profile (core/settings/test_requests.py).
    answer_crm_test_requests: bool = True
    # Track by category (SSS's TrackCategorizedItems): a user gives a message this Outlook category and the router
    # tracks it. Off by default: it costs one Graph query per eligible mailbox per search (docs/admin-guide.md);
    # searches ride the delta catch-up (DELTA_CATCHUP_SCHEDULE, 5 min), spaced by the interval.
    track_categorized_items: bool = False
    track_category_name: str = "Tracked to Dynamics 365"
    track_category_interval_minutes: int = 5


def _parse_int(lo: int, hi: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not an integer")
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError(f"{value!r} is not an integer") from None
        if not lo <= number <= hi:
            raise ValueError(f"{number} is outside {lo}..{hi}")
        return number

    return parse


def _parse_list(item: Callable[[str], str] = parse_text) -> Callable[[object], tuple[str, ...]]:
    """A JSON array or a comma/semicolon/newline separated list."""

    def parse(value: object) -> tuple[str, ...]:
        if isinstance(value, list | tuple):
            items = [str(v) for v in value]
        else:
            text = str(value).strip()
            if text.startswith("["):
                try:
                    loaded = json.loads(text)
                except ValueError:
                    raise ValueError("not a JSON array") from None
                items = [str(v) for v in loaded]
            else:
                items = re.split(r"[,;\n]", text)
        return tuple(item(i) for i in (s.strip() for s in items) if i)

    return parse


def _parse_domain(value: str) -> str:
    text = value.strip().lower().lstrip("@")
    if not re.match(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9-]+)+$", text):
        raise ValueError(f"{value!r} is not a domain")
    return text


def _parse_prefixes(value: object) -> tuple[str, ...]:
    # trackingprefix is a "history list of prefixes" whose separator is not documented; prefixes are 1-20 chars.
    items = _parse_list()(value)
    if not items:
        raise ValueError("at least one tracking prefix is needed")
    for p in items:
        if len(p) > 20:
            raise ValueError(f"prefix {p!r} is longer than 20 characters")
    return items


def _parse_category_name(value: object) -> str:
    # Outlook category names (outlookCategory.displayName) are free text; empty would match nothing, and a comma
    # would split the name in Outlook clients that store categories as a comma separated Keywords list.
    text = parse_text(value)
    if not text or len(text) > 255 or "," in text or ";" in text:
        raise ValueError(f"{text!r} is not a category name (1-255 characters, no comma or semicolon)")
    return text


def _parse_internal_values(value: object) -> frozenset[str]:
    return frozenset(v.lower() for v in _parse_list()(value))


parse_queue_owner_fallback = _enum_parser(QueueOwnerFallback, {})


@dataclass(frozen=True)
class OrgKey:
    """One org setting row. ``target`` = which dataclass it fills; ``crm`` = the organization column the sync copies
    into ``CrmValue`` (``Value`` written by an admin wins)."""

    key: str
    target: Literal["org", "router", "wrapper"]
    attr: str
    parse: Callable[[object], Any]
    help: str
    crm: str | None = None
    from_crm: Callable[[Any], str] | None = None  # the CRM column's value -> this setting's text


def _frozen(parse: Callable[[object], tuple[str, ...]]) -> Callable[[object], frozenset[str]]:
    return lambda v: frozenset(parse(v))


ORG_KEYS: Final[tuple[OrgKey, ...]] = (
    # tracking token and correlation (crm-ref §6.2, §10)
    OrgKey("TrackingPrefixes", "org", "tracking_prefixes", _parse_prefixes, "tracking token prefixes, newest first",
           "trackingprefix"),
    OrgKey("UseTrackingToken", "org", "use_tracking_token", parse_bool, "correlate on tracking tokens"),
    OrgKey("TrackingUserDigits", "org", "tracking_user_digits", _parse_int(1, 10), "digits for user numbers",
           "trackingtokeniddigits"),
    # organization.maximumtrackingnumber ("maximum tracking number before recycling takes place") fixes the counter
    # width: 999 -> 3 digits (audit dataverse-fidelity 1c #20).
    OrgKey("TrackingCounterDigits", "org", "tracking_counter_digits", _parse_int(1, 9),
           "digits for the message counter", "maximumtrackingnumber", lambda v: str(len(str(abs(int(v)))))),
    OrgKey("UseCorrelation", "org", "use_correlation", parse_bool, "header-based correlation",
           "emailcorrelationenabled"),
    OrgKey("IgnoreConversationIndexAndInReplyTo", "org", "ignore_conversation_index_and_in_reply_to", parse_bool,
           "IgnoreConversationIndexAndInReplyToForCorrelation"),
    OrgKey("UseReferences", "org", "use_references", parse_bool, "also correlate on References"),
    OrgKey("DoNotCorrelateForwardsAsReplies", "org", "do_not_correlate_forwards_as_replies", parse_bool,
           "DoNotCorrelateForwardedEmailsAsReplies"),
    OrgKey("ForwardSubjectPrefixes", "org", "forward_subject_prefixes",
           lambda v: tuple(p.lower() for p in _parse_list()(v)), "subject prefixes that mark a forward"),
    OrgKey("UseSyncingMailboxFilterOnly", "org", "use_syncing_mailbox_filter_only", parse_bool,
           "UseFilteringMethodOfSyncingMailboxOnlyForCorrelation"),
    # internal email, resolution (crm-ref §5.2, §7)
    OrgKey("IgnoreInternalEmail", "org", "ignore_internal_email", parse_bool, "skip mail between internal users",
           "ignoreinternalemail"),
    OrgKey("DoNotIgnoreInternalEmailToQueues", "org", "do_not_ignore_internal_email_to_queues", parse_bool,
           "DoNotIgnoreInternalEmailToQueues"),
    OrgKey("InternalDomains", "org", "internal_domains", _frozen(_parse_list(_parse_domain)),
           "domains counted as internal"),
    OrgKey("UnresolveIfMultipleMatch", "org", "unresolve_if_multiple_match", parse_bool,
           "leave an address unresolved when several records match", "unresolveemailaddressifmultiplematch"),
    OrgKey("ResolveForInactiveEntities", "org", "resolve_for_inactive_entities", parse_bool,
           "ResolveForInactiveEntities"),
    OrgKey("MaxAttachmentBytes", "org", "max_attachment_bytes", _parse_int(0, 150 * 1024 * 1024),
           "largest attachment stored in CRM (base64 size)", "maxuploadfilesize"),
    OrgKey("NeverLogAddresses", "org", "never_log_addresses", _frozen(_parse_list(normalise_address)),
           "addresses never tracked"),
    OrgKey("NeverLogDomains", "org", "never_log_domains", _frozen(_parse_list(_parse_domain)),
           "domains never tracked"),
    OrgKey("AllowUnresolvedPartiesOnSend", "org", "allow_unresolved_parties_on_send", parse_bool,
           "send to unresolved recipients", "allowunresolvedpartiesonemailsend"),
    OrgKey("MaxSubjectLength", "org", "max_subject_length_on_mail_server", _parse_int(20, 1000),
           "MaximumSubjectLengthOnMailServer"),
    OrgKey("RequireApprovalForUserEmail", "org", "require_approval_for_user_email", parse_bool,
           "only approved user mailboxes send/receive", "requireapprovalforuseremail"),
    OrgKey("RequireApprovalForQueueEmail", "org", "require_approval_for_queue_email", parse_bool,
           "only approved queue mailboxes send/receive", "requireapprovalforqueueemail"),
    OrgKey("QueueOwnerFallback", "org", "queue_owner_fallback", parse_queue_owner_fallback,
           "queue_owner | application_user"),
    OrgKey("TreatAutoResponseSuppressAsAutoReply", "org", "treat_auto_response_suppress_as_auto_reply", parse_bool,
           "X-Auto-Response-Suppress marks automatic mail"),
    OrgKey("TreatPrecedenceBulkAsAutoReply", "org", "treat_precedence_bulk_as_auto_reply", parse_bool,
           "Precedence: bulk marks automatic mail"),
    # queue items (core/domain/queue_items.py)
    OrgKey("CreateQueueItemsForAcceptingQueueRecipients", "org", "create_queue_items_for_accepting_queue_recipients",
           parse_bool, "a queue item for each resolved queue recipient of tracked incoming email"),
    OrgKey("CreateQueueItemForSynchronizingMailbox", "org", "create_queue_item_for_synchronizing_mailbox",
           parse_bool, "a queue item for the queue whose mailbox tracked the email (DL member, Bcc)"),
    OrgKey("CreateAdditionalQueueItemsForAlreadyTrackedEmail", "org",
           "create_additional_queue_items_for_already_tracked_email", parse_bool,
           "SSSCreateAdditionalQueueItemsForAlreadyTrackedEmail: the processing queue's item for mail tracked "
           "from another mailbox first"),
    OrgKey("WrapperRequireInternalAuth", "wrapper", "require_internal_auth", parse_bool,
           "forward wrappers must be submitted inside the tenant"),
    OrgKey("WrapperAuthAsHeader", "wrapper", "auth_as_header", parse_text, "header Exchange stamps on wrappers"),
    OrgKey("WrapperInternalAuthValues", "wrapper", "internal_auth_values", _parse_internal_values,
           "values of that header meaning internal"),
    # router-only
    OrgKey("TrackedCategory", "router", "tracked_category", parse_text, "Outlook category put on tracked mail"),
    OrgKey("UndeliverableCategory", "router", "undeliverable_category", parse_text,
           "category on processed-but-not-tracked mail"),
    OrgKey("SaveToSentItems", "router", "save_to_sent_items", parse_bool, "outbound copies kept in Sent Items"),
    OrgKey("OutboundMaxAttempts", "router", "outbound_max_attempts", _parse_int(1, 50),
           "send attempts before an email is marked Failed"),
    OrgKey("OutboundReaperTimeoutSeconds", "router", "outbound_reaper_timeout_seconds", _parse_int(60, 86400),
           "a claimed send older than this is retried"),
    OrgKey("CrmSyncIntervalMinutes", "router", "crm_sync_interval_minutes", _parse_int(1, 1440),
           "minimum gap between timer-driven CRM syncs"),
    OrgKey("DeleteAfterProcessingForSinks", "router", "delete_after_processing_for_sinks", parse_bool,
           "default for sinks without a DeleteAfterProcessing value"),
    OrgKey("DefaultForwardSink", "router", "default_forward_sink", parse_optional_address,
           "sink for forward users without a ForwardSink"),
    OrgKey("TrackSentItemsDefault", "router", "track_sent_items_default", parse_bool,
           "default of TrackSentItems (AutoTrackSentFolderItems)"),
    OrgKey("HealthProbeIntervalMinutes", "router", "health_probe_interval_minutes", _parse_int(1, 1440),
           "re-probe interval of healthy mailboxes and first back-off step"),
    OrgKey("HealthMaxBackoffMinutes", "router", "health_max_backoff_minutes", _parse_int(1, 10080),
           "longest back-off of a failing mailbox"),
    OrgKey("HealthPendingMinutes", "router", "health_pending_minutes", _parse_int(1, 1440),
           "how long a mailbox waiting for its first subscription shows as pending before it counts as failing"),
    OrgKey("ProcessedFolder", "router", "processed_folder", parse_text,
           "forward mailboxes: Inbox child folder processed wrappers are moved to when not deleted (\"\" = leave)"),
    OrgKey("UndeliverableFolder", "router", "undeliverable_folder", parse_text,
           "forward mailboxes: Inbox child folder for wrappers that cannot be delivered into CRM (\"\" = leave)"),
    OrgKey("ProcessedWrapperDays", "router", "processed_wrapper_days", _parse_int(0, 3650),
           "wrappers in the processed folder older than this are deleted by the retention timer (0 = never)"),
    OrgKey("RetentionDays", "router", "retention_days", _parse_int(1, 3650),
           "decision records, their index and the processed ledger are deleted after this many days"),
    OrgKey("RetentionIntervalMinutes", "router", "retention_interval_minutes", _parse_int(5, 10080),
           "how often the retention clean-up runs (with the delta catch-up timer)"),
    OrgKey("AlertSender", "router", "alert_sender", parse_optional_address,
           "mailbox that sends health alert emails (Graph sendMail)"),
    OrgKey("AlertRecipients", "router", "alert_recipients", _parse_list(normalise_address),
           "admins who get health alert emails"),
    OrgKey("AnswerCrmTestRequests", "router", "answer_crm_test_requests", parse_bool,
           "answer CRM's Test & Enable on router mailboxes without an email server profile"),
    OrgKey("TrackCategorizedItems", "router", "track_categorized_items", parse_bool,
           "users track a message by giving it the TrackCategoryName category in Outlook"),
    OrgKey("TrackCategoryName", "router", "track_category_name", _parse_category_name,
           "the Outlook category that asks for a message to be tracked"),
    OrgKey("TrackCategoryIntervalMinutes", "router", "track_category_interval_minutes", _parse_int(1, 1440),
           "least gap between two searches of a mailbox for categorised mail (they run with the delta catch-up)"),
)
_ORG_BY_KEY: Final[Mapping[str, OrgKey]] = {k.key.lower(): k for k in ORG_KEYS}


def org_key(name: str) -> OrgKey:
    spec = _ORG_BY_KEY.get(name.strip().lower())
    if spec is None:
        raise KeyError(f"unknown org setting {name!r}")
    return spec


@dataclass(frozen=True)
class OrgParseResult:
    org: OrgEmailSettings
    router: RouterSettings
    values: Mapping[str, Any]  # key -> parsed value in force (for the next round's last-good fallback)
    sources: Mapping[str, str]  # key -> "value" | "crm" | "default" | "last-good"
    errors: tuple[RowError, ...] = field(default=())


def parse_org_rows(rows: Iterable[Mapping[str, Any]], previous: Mapping[str, Any] | None = None) -> OrgParseResult:
    """Org rows -> settings. Per key: ``Value`` (admin) wins over ``CrmValue`` (sync) over the default; a bad value
    is reported and the previous good value of that key stays in force. Unknown keys are reported, not fatal."""
    previous = previous or {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    errors: list[RowError] = []
    for row in rows:
        key = str(row.get("RowKey", ""))
        spec = _ORG_BY_KEY.get(key.lower())
        if spec is None:
            errors.append(RowError(key, "", (f"unknown org setting {key!r}",)))
            continue
        for column, source in (("Value", "value"), ("CrmValue", "crm")):
            raw = row.get(column)
            if not _present(raw):
                continue
            try:
                values[spec.key] = spec.parse(raw)
                sources[spec.key] = source
            except ValueError as exc:
                errors.append(RowError(key, "", (f"{column}: {exc}",)))
                if spec.key in previous:
                    values[spec.key] = previous[spec.key]
                    sources[spec.key] = "last-good"
            break
    wrapper = replace(WrapperTrustPolicy(), **{k.attr: values[k.key] for k in ORG_KEYS
                                               if k.target == "wrapper" and k.key in values})
    org_kwargs = {k.attr: values[k.key] for k in ORG_KEYS if k.target == "org" and k.key in values}
    router_kwargs = {k.attr: values[k.key] for k in ORG_KEYS if k.target == "router" and k.key in values}
    org = OrgEmailSettings(**org_kwargs, wrapper_trust=wrapper)
    router = RouterSettings(**router_kwargs)
    return OrgParseResult(org, router, values, sources, tuple(errors))


def org_defaults() -> dict[str, Any]:
    """Default value per key (for ``emailrouter settings get``)."""
    org, router, wrapper = OrgEmailSettings(), RouterSettings(), WrapperTrustPolicy()
    source = {"org": org, "router": router, "wrapper": wrapper}
    return {k.key: getattr(source[k.target], k.attr) for k in ORG_KEYS}


def format_org_value(value: object) -> str:
    if isinstance(value, frozenset | tuple | list):
        return ", ".join(sorted(str(v) for v in value)) if isinstance(value, frozenset) else ", ".join(
            str(v) for v in value)
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)

