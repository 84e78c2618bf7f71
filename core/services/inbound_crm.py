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
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, Protocol

from core.adapters.dataverse import (
    AttachmentTooLargeError,
    DataverseClient,
    DataverseError,
    DuplicateRecordError,
    NotFoundError,
    PreconditionFailedError,
    map_error,
)
from core.adapters.odata import BatchRequest, BatchResponse, ChangeSet, build_query, in_, or_
from core.domain.correlation import CorrelationKeys, CorrelationLookup, KnownEmail
from core.domain.identity import canonical_message_id, outbound_activity_id
from core.domain.inbound import (
    TrackEmail,
    plan_attachment_rows,
    plan_contact_row,
    plan_email_row,
    plan_state_patch,
)
from core.domain.model import CrmRecordRef, CrmTable, PartyCandidate
from core.domain.parties import PartyDirectory

__all__ = [
    "AttachmentRejected",
    "CrmLookup",
    "DataverseInboundCrm",
    "InboundCrmGateway",
    "PartyTable",
    "StaleReference",
    "WriteOutcome",
]

log = logging.getLogger("emailrouter.inbound.crm")

_LOGICAL_NAME: Final = "Microsoft.Dynamics.CRM.lookuplogicalname"
_ANNOTATIONS: Final = {"Prefer": f'odata.include-annotations="{_LOGICAL_NAME}"'}
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
    return KnownEmail(activity_id, regarding=regarding, owner=owner, sent_on=sent_on)


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
        tables: Sequence[PartyTable] = PARTY_TABLES,
        party_ttl: float = 120.0,
        correlation_ttl: float = 60.0,
        coalesce_window: float = 0.01,
        include_read_only_columns: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._tables = tuple(tables)
        self._parties = _TtlCache(party_ttl, clock)
        self._keys = _TtlCache(correlation_ttl, clock)
        self._include_ro = include_read_only_columns
        self._coalescer = _Coalescer(self._send_lookups, window=coalesce_window, max_ops=_MAX_OPS_PER_BATCH)
        self.stats = GatewayStats()

    async def _send_lookups(self, requests: list[BatchRequest]) -> list[BatchResponse]:
        self.stats.lookup_batches += 1
        return await self._client.execute_batch(requests, continue_on_error=True)

    # -- lookup -------------------------------------------------------------------------------------------

    def _party_requests(self, addresses: Sequence[str]) -> list[tuple[PartyTable, BatchRequest]]:
        out: list[tuple[PartyTable, BatchRequest]] = []
        for start in range(0, len(addresses), _VALUES_PER_QUERY):
            chunk = addresses[start:start + _VALUES_PER_QUERY]
            for spec in self._tables:
                condition = or_(*(in_(column, chunk) for column in spec.address_columns))
                query = build_query(select=spec.select, filter=condition)
                out.append((spec, BatchRequest("GET", f"{spec.entity_set}?{query}", headers=_ANNOTATIONS)))
        return out

    @staticmethod
    def _email_request(message_ids: Sequence[str], tokens: Sequence[str], indexes: Sequence[str],
                       activity_ids: Sequence[str] = ()) -> BatchRequest:
        conditions = []
        if message_ids:
            conditions.append(in_("messageid", message_ids))
        if activity_ids:
            # Message-IDs the router chose for mail it sent name their CRM email (identity.outbound_message_id):
            # a Sent email keeps no messageid in CRM, so the reply finds it by its activity id.
            conditions.append(in_("activityid", activity_ids))
        if tokens:
            conditions.append(in_("trackingtoken", tokens))
        if indexes:
            conditions.append(in_("conversationindex", indexes))
        query = build_query(select=_EMAIL_SELECT, filter=or_(*conditions))
        return BatchRequest("GET", f"emails?{query}", headers=_ANNOTATIONS)

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

        party_plan = self._party_requests(missing)
        requests = [req for _, req in party_plan]
        sent_by_router = _router_message_ids(missing_keys["m"])
        if any(missing_keys.values()):
            requests.append(self._email_request(missing_keys["m"], missing_keys["t"], missing_keys["c"],
                                                sorted(sent_by_router)))
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
            if any(missing_keys.values()):
                rows = self._rows(responses[len(party_plan)])
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

    def _write_requests(self, plan: TrackEmail, *, with_contact: bool) -> list[tuple[str, BatchRequest]]:
        requests: list[tuple[str, BatchRequest]] = []
        contact = plan_contact_row(plan) if with_contact else None
        if contact is not None:
            requests.append(("contact", BatchRequest("POST", "contacts", contact, idempotent=True)))
        requests.append(("email", BatchRequest(
            "POST", "emails", plan_email_row(plan, include_read_only_columns=self._include_ro), idempotent=True)))
        for index, row in enumerate(plan_attachment_rows(plan)):
            requests.append((f"attachment:{index}", BatchRequest("POST", "activitymimeattachments", row,
                                                                 idempotent=True)))
        requests.append(("state", BatchRequest("PATCH", f"emails({plan.activity_id})", plan_state_patch(plan))))
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
        with_contact = plan.new_contact is not None
        for _ in range(2):  # second round only without the contact (it existed already)
            numbered = self._write_requests(plan, with_contact=with_contact)
            roles = [role for role, _ in numbered]
            self.stats.write_batches += 1
            try:
                await self._client.execute_batch([ChangeSet([r for _, r in numbered])])
            except (DuplicateRecordError, PreconditionFailedError) as exc:
                role = self._failed_role(exc, roles)
                if role == "email" or (role is None and await self._email_exists(plan.activity_id)):
                    self._remember_write(plan)
                    return WriteOutcome.ALREADY_TRACKED
                if role in ("contact", None) and with_contact:
                    with_contact = False  # another message created this sender's contact first: bind to it
                    continue
                raise
            except AttachmentTooLargeError as exc:
                role = self._failed_role(exc, roles) or ""
                if role.startswith("attachment:"):
                    attachment = plan.attachments[int(role.partition(":")[2])]
                    raise AttachmentRejected(attachment.filename, len(attachment.content)) from exc
                raise
            except NotFoundError as exc:
                # A bind target is gone (a cached contact was deleted, a regarding record removed): forget what
                # we cached about this message and let the caller look up and plan again.
                for party in plan.parties.parties:
                    self._parties.pop(party.address.address)
                self._keys.clear()
                raise StaleReference(str(exc)) from exc
            self._remember_write(plan)
            return WriteOutcome.CREATED
        raise AssertionError("unreachable: the write loop returns or raises")

    def _remember_write(self, plan: TrackEmail) -> None:
        email = KnownEmail(plan.activity_id, regarding=plan.regarding, owner=plan.owner, sent_on=plan.sent_on)
        self._keys.put(f"m:{plan.message_id}", email)
        if plan.tracking_token:
            self._keys.put(f"t:{plan.tracking_token}", email)
        if plan.conversation_index and self._include_ro:
            self._keys.put(f"c:{plan.conversation_index}", email)
        if plan.new_contact is not None:
            contact = plan.new_contact
            self._parties.put(contact.email, (PartyCandidate(CrmRecordRef(CrmTable.CONTACT, contact.contact_id),
                                                             owner=contact.owner),))
