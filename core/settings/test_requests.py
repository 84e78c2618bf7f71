"""CRM's **Test & Enable**, answered by the router for its own mailboxes.

The button on the CRM mailbox form (and the admin center's bulk "Test & Enable Mailboxes") sets
``mailbox.testemailconfigurationscheduled`` ("Indicates if the email configuration test has been scheduled for a
mailbox record", mailbox.md: Boolean, writable). Server-Side Synchronization (SSS) answers it for mailboxes that have
an email server profile; a mailbox without one is never touched by SSS ("Prevents email processing for inactive
mailboxes or mailboxes not associated with an email server profile", Server-side synchronization tables). Those are
the router's to answer:

1. one Dataverse query per run of the health timer (``MAILBOX_HEALTH_SCHEDULE``, every 30 s by default, so a
   request is picked up within 30 s of being set): ``mailboxes?$filter=testemailconfigurationscheduled eq true``;
2. :func:`decide_crm_test` (pure) per request: leave it to SSS (the record has an email server profile), wait
   (not in the router's settings yet: answered after the next CRM sync), back off (the last answer was refused), or
   answer;
3. answer = :meth:`MailboxHealthService.answer_test_request`: the health probe's checks, then ONE PATCH with the
   results (``incomingemailstatus``/``outgoingemailstatus``, ``testmailboxaccesscompletedon``, ``lastsyncerror``
   (<= 2048) and its code/time, ``lastsuccessfulsynccompletedon``) and ``testemailconfigurationscheduled`` = false.
   A refused PATCH leaves the request set; the mailbox's status row gets the reason (``CrmTestError``) and the
   next try waits ``HealthProbeIntervalMinutes`` (``CrmTestRetryOn``).

The router never writes ``incomingemailstatus``/``outgoingemailstatus`` to a record with an email server profile
(a Success there could switch SSS on, core/settings/health.py), so the profile is read fresh with the request.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from core.domain.model import MailboxConfig

from .crm_sync import CrmSource
from .health import ProbeOutcome
from .rows import MAILBOX_PARTITION, RouterSettings, format_value, parse_datetime, row_key
from .store import RowStore

__all__ = [
    "REQUEST_FILTER",
    "REQUEST_SELECT",
    "CrmTestAction",
    "CrmTestDecision",
    "CrmTestReport",
    "CrmTestRequest",
    "CrmTestRequestService",
    "crm_test_service_for",
    "decide_crm_test",
]

_log = logging.getLogger("emailrouter.settings.test_requests")

REQUEST_SELECT = ("mailboxid", "emailaddress", "_emailserverprofile_value", "testemailconfigurationscheduled")
REQUEST_FILTER = "testemailconfigurationscheduled eq true"
RUN_ROW = "crm-test-requests"  # MailboxStatus partition "router": the last run that found requests


@dataclass(frozen=True)
class CrmTestRequest:
    """One CRM mailbox record whose Test & Enable is pending."""

    mailbox_id: uuid.UUID
    address: str
    server_profile: bool

    @staticmethod
    def from_row(row: Mapping[str, Any]) -> CrmTestRequest | None:
        try:
            mailbox_id = uuid.UUID(str(row.get("mailboxid")))
        except ValueError:
            return None
        return CrmTestRequest(mailbox_id, str(row.get("emailaddress") or "").strip().lower(),
                           bool(row.get("_emailserverprofile_value")))


class CrmTestAction(StrEnum):
    ANSWER = "answer"
    LEAVE_TO_SSS = "leave_to_sss"
    NOT_KNOWN = "not_known"
    BACKING_OFF = "backing_off"


@dataclass(frozen=True)
class CrmTestDecision:
    action: CrmTestAction
    request: CrmTestRequest
    address: str  # the router mailbox to probe (its settings address), "" when not known
    why: str


def decide_crm_test(request: CrmTestRequest, mailboxes_by_id: Mapping[uuid.UUID, MailboxConfig],
                    status_row: Mapping[str, Any] | None, now: datetime) -> CrmTestDecision:
    """What to do with one pending Test & Enable (pure)."""
    if request.server_profile:
        return CrmTestDecision(CrmTestAction.LEAVE_TO_SSS, request, "",
                               "the mailbox has an email server profile: Server-Side Synchronization runs its "
                               "Test & Enable (remove the profile for the router to answer)")
    mailbox = mailboxes_by_id.get(request.mailbox_id)
    if mailbox is None:
        return CrmTestDecision(CrmTestAction.NOT_KNOWN, request, "",
                               "not in the router's settings yet: answered after the next CRM sync")
    retry = _when((status_row or {}).get("CrmTestRetryOn"))
    if retry is not None and retry > now:
        return CrmTestDecision(CrmTestAction.BACKING_OFF, request, mailbox.address,
                               f"the last answer was refused ({(status_row or {}).get('CrmTestError', '')}); "
                               f"next try {format_value(retry)}")
    return CrmTestDecision(CrmTestAction.ANSWER, request, mailbox.address, "router mailbox, no server profile")


def _when(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = parse_datetime(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


# ------------------------------------------------------------------------------------------------ ports


class CrmTestAnswerer(Protocol):
    """``core.settings.health.MailboxHealthService`` fits."""

    async def answer_test_request(self, address: str) -> ProbeOutcome: ...


class MailboxSettings(Protocol):
    async def list_mailboxes(self) -> Sequence[MailboxConfig]: ...

    async def get_router_settings(self) -> RouterSettings: ...


# ------------------------------------------------------------------------------------------------ shell


@dataclass
class CrmTestReport:
    found: int = 0
    answered: dict[str, str] = field(default_factory=dict)  # address -> health of the answer
    failed: dict[str, str] = field(default_factory=dict)  # address -> why the answer was not written
    waiting: list[CrmTestDecision] = field(default_factory=list)  # left to SSS, not known, backing off
    disabled: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"found": self.found, "answered": self.answered, "failed": self.failed, "disabled": self.disabled,
                "waiting": [{"mailboxid": str(d.request.mailbox_id), "address": d.request.address,
                             "action": d.action.value, "why": d.why} for d in self.waiting]}


class CrmTestRequestService:
    """Finds pending Test & Enable requests in CRM and answers the router's (the health timer, every tick)."""

    def __init__(self, crm: CrmSource, settings: MailboxSettings, health: CrmTestAnswerer, status: RowStore, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._crm = crm
        self._settings = settings
        self._health = health
        self._status = status
        self._clock = clock

    async def run(self) -> CrmTestReport:
        report = CrmTestReport()
        router = await self._settings.get_router_settings()
        if not router.answer_crm_test_requests:
            report.disabled = True
            return report
        requests = [r for r in [CrmTestRequest.from_row(row) async for row in self._crm.list(
            "mailboxes", select=REQUEST_SELECT, filter=REQUEST_FILTER)] if r is not None]
        report.found = len(requests)
        if not requests:
            return report  # the usual case: one Dataverse query, nothing written
        now = self._clock()
        by_id = {m.mailbox_id: m for m in await self._settings.list_mailboxes() if m.mailbox_id is not None}
        for request in requests:
            known = by_id.get(request.mailbox_id)
            row = await self._status_row(known.address) if known is not None else None
            decision = decide_crm_test(request, by_id, row, now)
            if decision.action is not CrmTestAction.ANSWER:
                report.waiting.append(decision)
                _log.debug("Test & Enable of mailbox %s not answered: %s", request.mailbox_id, decision.why)
                continue
            try:
                outcome = await self._health.answer_test_request(decision.address)
            except Exception as exc:
                why = _describe(exc)
                report.failed[decision.address] = why
                retry = now + timedelta(minutes=router.health_probe_interval_minutes)
                _log.warning("Test & Enable of %s not answered (%s); next try %s", decision.address, why,
                             format_value(retry))
                await self._status.upsert({"PartitionKey": MAILBOX_PARTITION, "RowKey": row_key(decision.address),
                                           "Address": decision.address, "CrmTestError": why[:1024],
                                           "CrmTestRetryOn": format_value(retry)}, mode="merge")
                continue
            report.answered[decision.address] = outcome.health.value
            _log.info("Test & Enable of %s answered from the router: %s", decision.address, outcome.health.value)
        await self._status.upsert({"PartitionKey": "router", "RowKey": RUN_ROW, "LastRunOn": format_value(now),
                                   "Found": report.found, "Answered": len(report.answered),
                                   "Failed": len(report.failed), "Waiting": len(report.waiting)}, mode="merge")
        return report

    async def _status_row(self, address: str) -> Mapping[str, Any] | None:
        try:
            return await self._status.get(MAILBOX_PARTITION, row_key(address))
        except KeyError:  # EntityNotFoundError is a KeyError
            return None


def _describe(exc: BaseException) -> str:
    # Class, status and code only (error texts can quote addresses).
    status = getattr(exc, "status", "")
    code = getattr(exc, "code", "")
    return " ".join(str(p) for p in (type(exc).__name__, status, code) if p not in ("", None))


def crm_test_service_for(container: Any, *, health: CrmTestAnswerer | None = None) -> CrmTestRequestService:
    from core.names import MAILBOX_STATUS_TABLE

    from .health import health_service_for
    from .store import TableMailboxDirectory

    directory = getattr(container, "mailbox_directory", None) or TableMailboxDirectory.from_account(container.storage)
    return CrmTestRequestService(container.dataverse, directory, health or health_service_for(container),
                                 container.storage.table(MAILBOX_STATUS_TABLE))

