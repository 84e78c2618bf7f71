"""The inbound pipeline's CRM port (:class:`InboundCrmGateway`) and its Dataverse implementation.

Two operations per message, each ONE Dataverse request at most:

* :meth:`InboundCrmGateway.lookup` - every party address (one GET per party table, all addresses at once) and every
  correlation key (one GET on ``emails``) in one ``$batch``. Concurrent lookups of several messages (a queue batch
  is processed concurrently) are coalesced into a single ``$batch`` within a few milliseconds, and results are kept
  in short-TTL caches, so the amortised cost is well below one request per email.
* :meth:`InboundCrmGateway.write` - the email, its parties (deep insert), attachments, an auto-created contact and
  the state change, in ONE change set (atomic). The activityid is deterministic (UUIDv5 of the Message-ID), so a
  repeated write - redelivery, a second tracked mailbox, a retry after a lost response - fails with a duplicate key
  and is reported as ``ALREADY_TRACKED``, never as a second email.

No decisions here: the gateway turns rows into the plain data of ``core.domain`` and plans into requests
(``plan_email_row`` & co.); what to track and how is decided by ``core.domain.inbound.plan_inbound``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Protocol

from core.adapters.dataverse import (
    AttachmentTooLargeError,
    BadRequestError,
    DataverseClient,
    DataverseError,
    DuplicateRecordError,
    NotFoundError,
    PreconditionFailedError,
    map_error,
)
from core.adapters.odata import BatchRequest, BatchResponse, ChangeSet, build_query, in_, literal, or_
from core.domain.correlation import CorrelationKeys, CorrelationLookup, KnownEmail
from core.domain.identity import canonical_message_id, outbound_activity_id
from core.domain.inbound import (
    TrackEmail,
    plan_attachment_rows,
    plan_contact_row,
    plan_email_row,
    plan_state_patch,
    unbound_relationships,
)
from core.domain.model import CrmRecordRef, CrmTable, PartyCandidate
from core.domain.org_schema import OrgSchema
from core.domain.parties import PartyDirectory
from core.services.org_schema import OrgSchemaCache, OrgSchemaSource

__all__ = [
    "PARTY_TABLES",
    "AttachmentRejected",
    "CrmLookup",
    "DataverseInboundCrm",
    "InboundCrmGateway",
    "PartyTable",
    "StaleReference",
    "WriteOutcome",
    "party_tables_for",
]

log = logging.getLogger("emailrouter.inbound.crm")

_LOGICAL_NAME: Final = "Microsoft.Dynamics.CRM.lookuplogicalname"
_ASSOCIATED_NAV: Final = "Microsoft.Dynamics.CRM.associatednavigationproperty"
_ANNOTATIONS: Final = {"Prefer": f'odata.include-annotations="{_LOGICAL_NAME}"'}
# Email lookups also ask for the navigation property each lookup is bound through: the regarding of a correlated
# email is copied through exactly that name (audit 1a #6), not a name spelled from the table.
_EMAIL_ANNOTATIONS: Final = {"Prefer": f'odata.include-annotations="{_LOGICAL_NAME},{_ASSOCIATED_NAV}"'}
# "A record with the specified key values does not exist in <entity> entity" (a bind target is gone); its status is
# NOT VERIFIED (400 or 404), so the text decides.
_DOES_NOT_EXIST: Final = re.compile(r"does not exist", re.IGNORECASE)
# Addresses / keys per inner GET: far below the 64 KB URL limit of a batch operation (dv-ref §5).
_VALUES_PER_QUERY: Final = 100
_MAX_OPS_PER_BATCH: Final = 200  # well below Dataverse's 1000 operations per $batch


class WriteOutcome(StrEnum):
    CREATED = "created"
    ALREADY_TRACKED = "already_tracked"


@dataclass(frozen=True)
class CrmLookup:
    """What CRM knows about one message's addresses and conversation (plain data for the planner)."""

    directory: PartyDirectory
    correlation: CorrelationLookup
    requests: int = 0  # Dataverse requests this lookup caused (0 = answered from the caches)


class AttachmentRejected(Exception):
    """Dataverse refused an attachment as too large (the org limit is lower than the one we planned with)."""

    def __init__(self, filename: str, size: int) -> None:
        super().__init__(f"attachment {filename!r} ({size} bytes) rejected as too large")
        self.filename = filename
        self.size = size


class StaleReference(Exception):
    """A record the plan binds to no longer exists (deleted after it was cached): look up again and re-plan."""


class InboundCrmGateway(Protocol):
    """The inbound pipeline's view of CRM."""

    async def lookup(self, addresses: Collection[str], keys: CorrelationKeys) -> CrmLookup: ...

    async def write(self, plan: TrackEmail) -> WriteOutcome: ...


# ------------------------------------------------------------------------------------------------ party tables


@dataclass(frozen=True)
class PartyTable:
    """An email-enabled table searched by address (dv-ref §4.2)."""

    table: str
    entity_set: str
    key: str
    address_columns: tuple[str, ...]
    name_column: str
    owned: bool = True  # has ownerid (systemusers do not)
    has_state: bool = True  # statecode 0 = active

    @property
    def select(self) -> tuple[str, ...]:
        columns = [self.key, self.name_column, *self.address_columns]
        if self.owned:
            columns.append("_ownerid_value")
        if self.has_state:
            columns.append("statecode")
        if self.table == CrmTable.SYSTEMUSER:
            columns.append("isdisabled")
        return tuple(columns)


PARTY_TABLES: Final[tuple[PartyTable, ...]] = (
    PartyTable(CrmTable.SYSTEMUSER, "systemusers", "systemuserid", ("internalemailaddress",), "fullname",
               owned=False, has_state=False),
    PartyTable(CrmTable.QUEUE, "queues", "queueid", ("emailaddress",), "name"),
    PartyTable(CrmTable.CONTACT, "contacts", "contactid", ("emailaddress1", "emailaddress2", "emailaddress3"),
               "fullname"),
    PartyTable(CrmTable.ACCOUNT, "accounts", "accountid", ("emailaddress1", "emailaddress2", "emailaddress3"),
               "name"),
    PartyTable(CrmTable.LEAD, "leads", "leadid", ("emailaddress1", "emailaddress2", "emailaddress3"), "fullname"),
)

_EMAIL_SELECT: Final = ("activityid", "messageid", "trackingtoken", "conversationindex", "senton",
                        "_regardingobjectid_value", "_ownerid_value")


def party_tables_for(schema: OrgSchema, documented: Sequence[PartyTable] = PARTY_TABLES) -> tuple[PartyTable, ...]:
    """The tables an address is looked up in: every email-enabled table the org has (its metadata, read with the
    org's names), bounded by ``core.services.org_schema.MAX_EMAIL_TABLES``. Pure.

    The documented five keep the columns the router always searched (systemuser: internalemailaddress only - a
    user's personal address does not make mail theirs; queue: emailaddress; contact/account/lead: emailaddress1-3)
    and come first; any other email-enabled table (equipment, custom tables) is searched on its Email-format
    columns. A documented table the org does not report as email-enabled (lead in an org without Sales) is not
    queried. Before the org's metadata is read: the documented five."""
    if not schema.from_org or not schema.email_enabled:
        return tuple(documented)
    known = {t.table: t for t in documented}
    reported = {t.logical_name: t for t in schema.email_enabled}
    out = [PartyTable(spec.table, reported[spec.table].entity_set, spec.key, spec.address_columns, spec.name_column,
                      owned=spec.owned, has_state=spec.has_state)
           for spec in documented if spec.table in reported]
    for table in sorted(reported.values(), key=lambda t: t.logical_name):
        if table.logical_name in known:
            continue
        out.append(PartyTable(table.logical_name, table.entity_set, table.primary_id, table.email_columns,
                              table.primary_name, owned=table.owned, has_state=table.has_state))
    return tuple(out)


def _ref(table: str | None, value: object) -> CrmRecordRef | None:
    if not value or not table:
        return None
    try:
        return CrmRecordRef(str(table), uuid.UUID(str(value)))
    except ValueError:
        return None


def party_candidates(spec: PartyTable, row: Mapping[str, Any]) -> tuple[list[str], PartyCandidate] | None:
    """One row -> (its lower-cased addresses, the candidate). Pure (unit-tested)."""
    record = _ref(spec.table, row.get(spec.key))
    if record is None:
        return None
    owner = None
    if spec.owned:
        # Owner is a systemuser or a team; without the annotation (older orgs/proxies) assume a user.
        owner = _ref(row.get(f"_ownerid_value@{_LOGICAL_NAME}") or CrmTable.SYSTEMUSER, row.get("_ownerid_value"))
    state = row.get("statecode")
    candidate = PartyCandidate(
        record=record, owner=owner,
        is_active=state in (None, 0),
        is_disabled_user=bool(row.get("isdisabled")),
        display_name=str(row.get(spec.name_column) or ""),
    )
    addresses = [str(row[c]).strip().lower() for c in spec.address_columns if row.get(c)]
    return addresses, candidate


def _router_message_ids(message_ids: Sequence[str]) -> dict[str, str]:
    """activity id -> Message-ID for the ids among ``message_ids`` that the router chose for mail it sent."""
    found: dict[str, str] = {}
    for message_id in message_ids:
        activity_id = outbound_activity_id(message_id)
        if activity_id is not None:
            found.setdefault(str(activity_id), message_id)
    return found


def known_email(row: Mapping[str, Any]) -> KnownEmail | None:
    """An ``emails`` row -> :class:`KnownEmail`. Pure (unit-tested)."""
    try:
        activity_id = uuid.UUID(str(row.get("activityid")))
    except ValueError:
        return None
    regarding = _ref(row.get(f"_regardingobjectid_value@{_LOGICAL_NAME}"), row.get("_regardingobjectid_value"))
    owner = _ref(row.get(f"_ownerid_value@{_LOGICAL_NAME}") or CrmTable.SYSTEMUSER, row.get("_ownerid_value"))
    sent_on = None
    raw_sent = row.get("senton")
    if isinstance(raw_sent, str) and raw_sent:
        try:
            sent_on = datetime.fromisoformat(raw_sent.replace("Z", "+00:00"))
        except ValueError:
            sent_on = None
    nav = row.get(f"_regardingobjectid_value@{_ASSOCIATED_NAV}")
    return KnownEmail(activity_id, regarding=regarding, owner=owner, sent_on=sent_on,
                      regarding_nav=str(nav) if regarding is not None and nav else None)


# ------------------------------------------------------------------------------------------------ caches


class _TtlCache:
    """Tiny TTL map (process-local). Monotonic clock injectable for tests."""

    def __init__(self, ttl: float, clock: Callable[[], float], max_entries: int = 50_000) -> None:
        self._ttl = ttl
        self._clock = clock
        self._max = max_entries
        self._data: dict[str, tuple[float, Any]] = {}

    def get(self, key: str) -> tuple[bool, Any]:
        hit = self._data.get(key)
        if hit is None:
            return False, None
        if hit[0] <= self._clock():
            self._data.pop(key, None)
            return False, None
        return True, hit[1]

    def put(self, key: str, value: Any) -> None:
        if self._ttl <= 0:
            return
        if len(self._data) >= self._max:
            # Drop the oldest third: cheap, bounded, good enough for a cache this short-lived.
            for stale in sorted(self._data, key=lambda k: self._data[k][0])[: self._max // 3]:
                self._data.pop(stale, None)
        self._data[key] = (self._clock() + self._ttl, value)

    def pop(self, key: str) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()


# ------------------------------------------------------------------------------------------------ coalescing


BatchSender = Callable[[list[BatchRequest]], Awaitable[list[BatchResponse]]]


class _Coalescer:
    """Joins the lookup GETs of concurrent callers into one ``$batch`` (continue-on-error, so one caller's bad
    query fails only that caller). A caller waits at most ``window`` seconds for company."""

    def __init__(self, send: BatchSender, *, window: float, max_ops: int) -> None:
        self._send = send
        self._window = window
        self._max_ops = max_ops
        self._pending: list[tuple[list[BatchRequest], asyncio.Future[list[BatchResponse]]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps only weak ones
        self.batches = 0

    async def run(self, requests: list[BatchRequest]) -> list[BatchResponse]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[BatchResponse]] = loop.create_future()
        self._pending.append((requests, future))
        if sum(len(r) for r, _ in self._pending) >= self._max_ops or self._window <= 0:
            self._flush_now()
        elif self._timer is None:
            self._timer = loop.call_later(self._window, self._flush_now)
        return await future

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        if pending:
            self.batches += 1
            task = asyncio.ensure_future(self._flush(pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self, pending: list[tuple[list[BatchRequest], asyncio.Future[list[BatchResponse]]]]) -> None:
        flat = [r for requests, _ in pending for r in requests]
        try:
            responses = await self._send(flat)
        except BaseException as exc:  # every waiting caller gets the failure (then decides: retry/raise)
            for _, future in pending:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        offset = 0
        for requests, future in pending:
            part = responses[offset:offset + len(requests)]
            offset += len(requests)
            if not future.done():
                future.set_result(part)


# ------------------------------------------------------------------------------------------------ the gateway


@dataclass
class GatewayStats:
    lookup_batches: int = 0
    write_batches: int = 0
    extra_requests: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class DataverseInboundCrm:
    """:class:`InboundCrmGateway` over :class:`DataverseClient`.

    ``party_ttl`` caches address -> rows (including "no rows") per address; ``correlation_ttl`` caches key ->
    email (including "no email"). Our own writes update both at once, so only records created by someone else
    within the TTL are seen late (a newly created contact resolves at most ``party_ttl`` seconds later; the email
    is still tracked, with that address unresolved). Set a TTL to 0 to switch its cache off.
    """

    def __init__(
        self,
        client: DataverseClient,
        *,
        tables: Sequence[PartyTable] | None = None,
        party_ttl: float = 120.0,
        correlation_ttl: float = 60.0,
        coalesce_window: float = 0.01,
        include_read_only_columns: bool = False,
        correlation_days: int = 90,
        schema: OrgSchemaSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._client = client
        # Correlation looks back this many days (createdon lower bound), like SSS smart matching's default window;
        # 0 = no bound. Keeps the three key lookups index-friendly on orgs with millions of emails.
        self._correlation_days = correlation_days
        self._now = now
        self._schema = schema if schema is not None else OrgSchemaCache(client)
        self._tables = tuple(tables) if tables is not None else None  # None: the org's email-enabled tables
        self._parties = _TtlCache(party_ttl, clock)
        self._keys = _TtlCache(correlation_ttl, clock)
        self._include_ro = include_read_only_columns
        self._coalescer = _Coalescer(self._send_lookups, window=coalesce_window, max_ops=_MAX_OPS_PER_BATCH)
        self.stats = GatewayStats()

    async def _send_lookups(self, requests: list[BatchRequest]) -> list[BatchResponse]:
        self.stats.lookup_batches += 1
        return await self._client.execute_batch(requests, continue_on_error=True)

    # -- lookup -------------------------------------------------------------------------------------------

    async def party_tables(self) -> tuple[PartyTable, ...]:
        if self._tables is not None:
            return self._tables
        return party_tables_for(await self._schema.get())

    def _party_requests(self, addresses: Sequence[str], tables: Sequence[PartyTable]
                        ) -> list[tuple[PartyTable, BatchRequest]]:
        out: list[tuple[PartyTable, BatchRequest]] = []
        for start in range(0, len(addresses), _VALUES_PER_QUERY):
            chunk = addresses[start:start + _VALUES_PER_QUERY]
            for spec in tables:
                condition = or_(*(in_(column, chunk) for column in spec.address_columns))
                query = build_query(select=spec.select, filter=condition)
                out.append((spec, BatchRequest("GET", f"{spec.entity_set}?{query}", headers=_ANNOTATIONS)))
        return out

    def _email_requests(self, missing: Mapping[str, Sequence[str]],
                        sent_by_router: Mapping[str, str] | None = None) -> list[tuple[str, BatchRequest]]:
        """One GET per key kind (message ids, tracking tokens, conversation indexes), each bounded by createdon:
        three simple indexed queries instead of one OR across columns. Plus, for Message-IDs the router chose for
        mail it sent (identity.outbound_message_id), a GET by the activity id they name: a Sent email keeps no
        messageid in CRM, so a reply finds it by its primary key (no date bound: a reply may come months later)."""
        column = {"m": "messageid", "t": "trackingtoken", "c": "conversationindex"}
        since = None
        if self._correlation_days > 0:
            since = f"createdon ge {literal(self._now() - timedelta(days=self._correlation_days))}"
        out: list[tuple[str, BatchRequest]] = []
        for kind in ("m", "t", "c"):
            values = missing.get(kind) or []
            if not values:
                continue
            condition = in_(column[kind], values)
            query = build_query(select=_EMAIL_SELECT, filter=f"{condition} and {since}" if since else condition)
            out.append((kind, BatchRequest("GET", f"emails?{query}", headers=_EMAIL_ANNOTATIONS)))
        if sent_by_router:
            query = build_query(select=_EMAIL_SELECT, filter=in_("activityid", sorted(sent_by_router)))
            out.append(("a", BatchRequest("GET", f"emails?{query}", headers=_EMAIL_ANNOTATIONS)))
        return out

    async def lookup(self, addresses: Collection[str], keys: CorrelationKeys) -> CrmLookup:
        wanted = sorted({a.strip().lower() for a in addresses if a and a.strip()})
        directory: dict[str, tuple[PartyCandidate, ...]] = {}
        missing: list[str] = []
        for address in wanted:
            hit, value = self._parties.get(address)
            if hit:
                directory[address] = value
                self.stats.cache_hits += 1
            else:
                missing.append(address)
                self.stats.cache_misses += 1

        key_kinds = (("m", keys.message_ids[:_VALUES_PER_QUERY]), ("t", keys.tracking_tokens[:_VALUES_PER_QUERY]),
                     ("c", keys.conversation_indexes[:_VALUES_PER_QUERY]))
        known: dict[str, KnownEmail | None] = {}
        missing_keys: dict[str, list[str]] = {"m": [], "t": [], "c": []}
        for kind, values in key_kinds:
            for value in values:
                hit, email = self._keys.get(f"{kind}:{value}")
                if hit:
                    known[f"{kind}:{value}"] = email
                else:
                    missing_keys[kind].append(value)

        party_plan = self._party_requests(missing, await self.party_tables() if missing else ())
        sent_by_router = _router_message_ids(missing_keys["m"])
        email_plan = self._email_requests(missing_keys, sent_by_router)
        requests = [req for _, req in party_plan] + [req for _, req in email_plan]
        if requests:
            responses = await self._coalescer.run(requests)
            found: dict[str, list[PartyCandidate]] = {a: [] for a in missing}
            for (spec, _), response in zip(party_plan, responses, strict=False):
                for row in self._rows(response):
                    parsed = party_candidates(spec, row)
                    if parsed is None:
                        continue
                    row_addresses, candidate = parsed
                    for address in set(row_addresses):
                        if address in found:
                            found[address].append(candidate)
            for address, candidates in found.items():
                value = tuple(candidates)
                directory[address] = value
                self._parties.put(address, value)
            if email_plan:
                rows = [row for response in responses[len(party_plan):] for row in self._rows(response)]
                self._remember_emails(rows, missing_keys, known, sent_by_router)

        lookup = CorrelationLookup(
            by_message_id={k[2:]: v for k, v in known.items() if k.startswith("m:") and v is not None},
            by_tracking_token={k[2:]: v for k, v in known.items() if k.startswith("t:") and v is not None},
            by_conversation_index={k[2:]: v for k, v in known.items() if k.startswith("c:") and v is not None},
        )
        return CrmLookup(directory, lookup, requests=1 if requests else 0)

    def _rows(self, response: BatchResponse) -> list[dict[str, Any]]:
        if not response.ok:
            raise map_error(response.status, response.body, response.headers)
        data = response.json() or {}
        rows = list(data.get("value", []))
        if data.get("@odata.nextLink"):
            # More matches than one page (thousands of rows for a handful of addresses): not worth following for
            # party resolution; logged so an admin can see why some parties resolved to a subset.
            log.warning("lookup returned more than one page; later pages ignored")
        return rows

    def _remember_emails(self, rows: list[dict[str, Any]], asked: Mapping[str, list[str]],
                         known: dict[str, KnownEmail | None], sent_by_router: Mapping[str, str] | None = None
                         ) -> None:
        # Deterministic choice when several emails share a key: the lowest activity id.
        rows = sorted(rows, key=lambda r: str(r.get("activityid")))
        results: dict[str, KnownEmail] = {}
        for row in rows:
            email = known_email(row)
            if email is None:
                continue
            router_id = (sent_by_router or {}).get(str(email.activity_id))
            if router_id is not None:
                results.setdefault(f"m:{router_id}", email)
            if row.get("messageid"):
                try:
                    results.setdefault(f"m:{canonical_message_id(str(row['messageid']))}", email)
                except ValueError:  # a CRM messageid that is no Message-ID can't be a correlation key
                    pass
            if row.get("trackingtoken"):
                results.setdefault(f"t:{row['trackingtoken']}", email)
            if row.get("conversationindex"):
                results.setdefault(f"c:{row['conversationindex']}", email)
        for kind, values in asked.items():
            for value in values:
                key = f"{kind}:{value}"
                # Dataverse compares strings case-insensitively; tracking tokens may differ in case.
                hit = results.get(key) or next(
                    (e for k, e in results.items() if k.lower() == key.lower()), None)
                known[key] = hit
                self._keys.put(key, hit)

    # -- write --------------------------------------------------------------------------------------------

    def _write_requests(self, plan: TrackEmail, schema: OrgSchema, *, with_contact: bool
                        ) -> list[tuple[str, BatchRequest]]:
        requests: list[tuple[str, BatchRequest]] = []
        emails = schema.entity_set("email") or "emails"
        contact = plan_contact_row(plan, schema) if with_contact else None
        if contact is not None:
            requests.append(("contact", BatchRequest("POST", schema.entity_set("contact") or "contacts", contact,
                                                     idempotent=True)))
        requests.append(("email", BatchRequest(
            "POST", emails, plan_email_row(plan, schema, include_read_only_columns=self._include_ro),
            idempotent=True)))
        attachments = schema.entity_set("activitymimeattachment") or "activitymimeattachments"
        for index, row in enumerate(plan_attachment_rows(plan, schema)):
            requests.append((f"attachment:{index}", BatchRequest("POST", attachments, row, idempotent=True)))
        requests.append(("state", BatchRequest("PATCH", f"{emails}({plan.activity_id})", plan_state_patch(plan))))
        # Content-IDs are 1..n in order: the failed part of a change set is recognised by its Content-ID.
        return [(role, BatchRequest(r.method, r.url, r.body, r.headers, str(n), r.idempotent))
                for n, (role, r) in enumerate(requests, start=1)]

    @staticmethod
    def _failed_role(exc: DataverseError, roles: Sequence[str]) -> str | None:
        responses: list[BatchResponse] = list(getattr(exc, "batch_responses", None) or [])
        for response in responses:
            if response.ok:
                continue
            if response.content_id and response.content_id.isdigit():
                index = int(response.content_id) - 1
                if 0 <= index < len(roles):
                    return roles[index]
            if len(responses) == len(roles):
                return roles[responses.index(response)]
            return None
        return None

    async def _email_exists(self, activity_id: uuid.UUID) -> bool:
        self.stats.extra_requests += 1
        try:
            await self._client.get("emails", activity_id, select=["activityid"])
        except NotFoundError:
            return False
        return True

    async def write(self, plan: TrackEmail) -> WriteOutcome:
        schema = await self._schema.get()
        unbound = unbound_relationships(plan, schema)
        if unbound:
            log.info("email %s: the org declares no navigation property for %s; tracked without those links",
                     plan.activity_id, ", ".join(unbound))
        with_contact = plan.new_contact is not None
        for _ in range(2):  # second round only without the contact (it existed already)
            numbered = self._write_requests(plan, schema, with_contact=with_contact)
            roles = [role for role, _ in numbered]
            self.stats.write_batches += 1
            try:
                await self._client.execute_batch([ChangeSet([r for _, r in numbered])])
            except (DuplicateRecordError, PreconditionFailedError) as exc:
                role = self._failed_role(exc, roles)
                if role == "email" or (role is None and await self._email_exists(plan.activity_id)):
                    self._remember_write(plan, schema)
                    return WriteOutcome.ALREADY_TRACKED
                if role in ("contact", None) and with_contact:
                    with_contact = False  # another message created this sender's contact first: bind to it
                    continue
                raise
            except AttachmentTooLargeError as exc:
                role = self._failed_role(exc, roles)
                if role is None and plan.attachments:
                    # Real failed change sets carry no Content-ID (audit 1a #7): 0x80044a02 can only come from an
                    # attachment, and the largest one is the one over any limit the others are under.
                    largest = max(range(len(plan.attachments)), key=lambda i: len(plan.attachments[i].content))
                    role = f"attachment:{largest}"
                if role is not None and role.startswith("attachment:"):
                    attachment = plan.attachments[int(role.partition(":")[2])]
                    raise AttachmentRejected(attachment.filename, len(attachment.content)) from exc
                raise
            except BadRequestError as exc:
                if not _DOES_NOT_EXIST.search(exc.message or ""):
                    raise
                self._forget(plan)
                raise StaleReference(str(exc)) from exc
            except NotFoundError as exc:
                # A bind target is gone (a cached contact was deleted, a regarding record removed): forget what
                # we cached about this message and let the caller look up and plan again.
                self._forget(plan)
                raise StaleReference(str(exc)) from exc
            self._remember_write(plan, schema)
            return WriteOutcome.CREATED
        raise AssertionError("unreachable: the write loop returns or raises")

    def _forget(self, plan: TrackEmail) -> None:
        for party in plan.parties.parties:
            self._parties.pop(party.address.address)
        self._keys.clear()

    def _remember_write(self, plan: TrackEmail, schema: OrgSchema) -> None:
        nav = plan.regarding_nav
        if nav is None and plan.regarding is not None:
            nav = schema.nav("email", "regardingobjectid", plan.regarding.table)
        email = KnownEmail(plan.activity_id, regarding=plan.regarding, owner=plan.owner, sent_on=plan.sent_on,
                           regarding_nav=nav)
        self._keys.put(f"m:{plan.message_id}", email)
        if plan.tracking_token:
            self._keys.put(f"t:{plan.tracking_token}", email)
        if plan.conversation_index and self._include_ro:
            self._keys.put(f"c:{plan.conversation_index}", email)
        if plan.new_contact is not None:
            contact = plan.new_contact
            self._parties.put(contact.email, (PartyCandidate(CrmRecordRef(CrmTable.CONTACT, contact.contact_id),
                                                             owner=contact.owner),))
