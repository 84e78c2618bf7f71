"""CRM's Test & Enable answered by the router: the decision per request, the PATCH that answers it, the service
over fakes of our own ports, and the cadence (schedule arithmetic, no timed test)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core import config
from core.domain.model import CrmRecordRef, CrmTable, InboundMethod, MailboxConfig, MailboxKind, OutboundMethod
from core.settings.health import (
    LAST_SYNC_ERROR_MAX,
    CheckResult,
    Health,
    ProbeOutcome,
    ProbeState,
    crm_test_answer,
)
from core.settings.rows import RouterSettings, format_value, row_key
from core.settings.test_requests import (
    REQUEST_FILTER,
    CrmTestAction,
    CrmTestRequest,
    CrmTestRequestService,
    decide_crm_test,
)
from local.host.schedule import parse_schedule
from tests.unit.settings.memstore import MemoryRowStore

NOW = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
MAILBOX_ID = uuid.UUID(int=77)
ALICE = MailboxConfig("alice@x.example", MailboxKind.USER, owner=CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=1)),
                      mailbox_id=MAILBOX_ID, inbound_method=InboundMethod.INDIVIDUAL,
                      outbound_method=OutboundMethod.ROUTER)
MAILBOX_SCHEMA = Path(__file__).resolve().parents[3] / "emulators/dataverse/reference/tables/mailbox.json"


def request(*, profile: bool = False, mailbox_id: uuid.UUID = MAILBOX_ID) -> CrmTestRequest:
    return CrmTestRequest(mailbox_id, "alice@x.example", profile)


def outcome(health: Health, *checks: CheckResult) -> ProbeOutcome:
    side = health if health is not Health.NOT_APPLICABLE else Health.NOT_APPLICABLE
    return ProbeOutcome("alice@x.example", health, side, side, checks, ProbeState())


# ------------------------------------------------------------------------------------------------ decision


def test_a_mailbox_with_a_server_profile_is_left_to_sss() -> None:
    decision = decide_crm_test(request(profile=True), {MAILBOX_ID: ALICE}, None, NOW)
    assert decision.action is CrmTestAction.LEAVE_TO_SSS and "server profile" in decision.why


def test_a_mailbox_the_router_does_not_know_waits_for_the_crm_sync() -> None:
    decision = decide_crm_test(request(mailbox_id=uuid.UUID(int=5)), {MAILBOX_ID: ALICE}, None, NOW)
    assert decision.action is CrmTestAction.NOT_KNOWN and "CRM sync" in decision.why


def test_a_refused_answer_backs_off_then_is_tried_again() -> None:
    row = {"CrmTestRetryOn": format_value(NOW + timedelta(minutes=5)), "CrmTestError": "ForbiddenError 403"}
    assert decide_crm_test(request(), {MAILBOX_ID: ALICE}, row, NOW).action is CrmTestAction.BACKING_OFF
    later = decide_crm_test(request(), {MAILBOX_ID: ALICE}, row, NOW + timedelta(minutes=6))
    assert later.action is CrmTestAction.ANSWER and later.address == "alice@x.example"


# ------------------------------------------------------------------------------------------------ the answer


def _writable_mailbox_columns() -> set[str]:
    columns = json.loads(MAILBOX_SCHEMA.read_text(encoding="utf-8"))["columns"]
    return {name for name, spec in columns.items() if spec.get("valid_for_update")}


def test_the_answer_writes_results_and_clears_the_request_in_writable_columns_only() -> None:
    ok = crm_test_answer(outcome(Health.OK, CheckResult("graph_read", True, "Inbox readable")), ALICE, NOW)
    assert ok["testemailconfigurationscheduled"] is False
    assert (ok["incomingemailstatus"], ok["outgoingemailstatus"]) == (1, 1)
    assert ok["testmailboxaccesscompletedon"] == ok["lastsuccessfulsynccompletedon"] == format_value(NOW)
    assert ok["lastsyncerror"] == "" and ok["lastsyncerrorcode"] == 0
    assert "testemailconfigurationretrycount" not in ok  # SSS's own retry counter is left alone
    failing = crm_test_answer(outcome(Health.FAILING, CheckResult("graph_read", False, "x" * 5000, 403)), ALICE, NOW)
    assert (failing["incomingemailstatus"], failing["lastsyncerrorcode"]) == (2, 403)
    assert len(failing["lastsyncerror"]) == LAST_SYNC_ERROR_MAX  # String(2048) in mailbox.md
    for body in (ok, failing):
        assert set(body) <= _writable_mailbox_columns(), set(body) - _writable_mailbox_columns()


def test_a_mailbox_the_router_does_not_serve_is_answered_not_run_with_the_reason() -> None:
    outlook = MailboxConfig("carol@x.example", MailboxKind.USER, owner=ALICE.owner, mailbox_id=MAILBOX_ID,
                            inbound_method=InboundMethod.OUTLOOK, outbound_method=OutboundMethod.OUTLOOK)
    body = crm_test_answer(outcome(Health.NOT_APPLICABLE), outlook, NOW)
    assert (body["incomingemailstatus"], body["outgoingemailstatus"]) == (0, 0)
    assert "incoming: outlook" in body["lastsyncerror"] and body["testemailconfigurationscheduled"] is False


# ------------------------------------------------------------------------------------------------ the service


class FakeCrm:
    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = list(rows)
        self.queries: list[tuple[str, str | None]] = []

    async def list(self, entity_set: str, *, select: Sequence[str] | None = None, filter: str | None = None,
                   page_size: int | None = None) -> AsyncIterator[dict[str, Any]]:
        self.queries.append((entity_set, filter))
        for row in self.rows:
            yield row


class FakeSettings:
    def __init__(self, mailboxes: Sequence[MailboxConfig], router: RouterSettings | None = None) -> None:
        self.mailboxes = list(mailboxes)
        self.router = router or RouterSettings()

    async def list_mailboxes(self) -> Sequence[MailboxConfig]:
        return self.mailboxes

    async def get_router_settings(self) -> RouterSettings:
        return self.router


class FakeHealth:
    def __init__(self) -> None:
        self.answered: list[str] = []
        self.refuse: Exception | None = None

    async def answer_test_request(self, address: str) -> ProbeOutcome:
        if self.refuse is not None:
            raise self.refuse
        self.answered.append(address)
        return outcome(Health.OK)


class Refused(Exception):
    status = 403
    code = "0x80040220"


def row(mailbox_id: uuid.UUID = MAILBOX_ID, *, profile: str | None = None) -> dict[str, Any]:
    return {"mailboxid": str(mailbox_id), "emailaddress": "Alice@x.example", "_emailserverprofile_value": profile,
            "testemailconfigurationscheduled": True}


async def test_one_run_answers_a_pending_request_and_leaves_the_others() -> None:
    crm = FakeCrm([row(), row(uuid.UUID(int=8), profile=str(uuid.uuid4())), row(uuid.UUID(int=9))])
    health, status = FakeHealth(), MemoryRowStore()
    report = await CrmTestRequestService(crm, FakeSettings([ALICE]), health, status, clock=lambda: NOW).run()

    assert crm.queries == [("mailboxes", REQUEST_FILTER)]
    assert health.answered == ["alice@x.example"] and report.answered == {"alice@x.example": "ok"}
    assert sorted(d.action.value for d in report.waiting) == ["leave_to_sss", "not_known"]
    assert status.rows[("router", "crm-test-requests")]["Answered"] == 1


async def test_nothing_pending_costs_one_query_and_no_write() -> None:
    crm, status = FakeCrm([]), MemoryRowStore()
    report = await CrmTestRequestService(crm, FakeSettings([ALICE]), FakeHealth(), status, clock=lambda: NOW).run()
    assert report.found == 0 and len(crm.queries) == 1 and status.writes == 0


async def test_switched_off_it_asks_crm_nothing() -> None:
    crm = FakeCrm([row()])
    settings = FakeSettings([ALICE], RouterSettings(answer_crm_test_requests=False))
    report = await CrmTestRequestService(crm, settings, FakeHealth(), MemoryRowStore(), clock=lambda: NOW).run()
    assert report.disabled and crm.queries == []


async def test_a_refused_answer_is_recorded_and_retried_after_the_back_off() -> None:
    crm, health, status = FakeCrm([row()]), FakeHealth(), MemoryRowStore()
    health.refuse = Refused()
    clock = [NOW]
    service = CrmTestRequestService(crm, FakeSettings([ALICE]), health, status, clock=lambda: clock[0])

    first = await service.run()
    assert first.failed == {"alice@x.example": "Refused 403 0x80040220"}
    status_row = status.rows[("mailbox", row_key("alice@x.example"))]
    assert status_row["CrmTestError"] == "Refused 403 0x80040220"
    health.refuse = None
    clock[0] = NOW + timedelta(minutes=1)
    assert [d.action for d in (await service.run()).waiting] == [CrmTestAction.BACKING_OFF]
    clock[0] = NOW + timedelta(minutes=16)  # HealthProbeIntervalMinutes (15) later
    assert (await service.run()).answered == {"alice@x.example": "ok"}


# ------------------------------------------------------------------------------------------------ cadence


def test_the_default_schedule_answers_a_request_within_a_minute() -> None:
    """The health timer looks for requests on every tick: with the default MAILBOX_HEALTH_SCHEDULE a request set at
    any moment of a day meets a tick at most 30 s later (the integration test shows one tick answers it)."""
    schedule = parse_schedule(config._BY_NAME["MAILBOX_HEALTH_SCHEDULE"].default or "")
    start = datetime(2030, 1, 1, tzinfo=UTC)
    moment, longest = start, timedelta(0)
    while moment < start + timedelta(days=1):
        following = schedule.next_after(moment)
        longest = max(longest, following - moment)
        moment = following
    assert longest <= timedelta(seconds=30)


@pytest.mark.parametrize("expression", ["0 */5 * * * *", "0 * * * * *"])
def test_the_arithmetic_notices_a_schedule_too_slow_for_the_promise(expression: str) -> None:
    schedule = parse_schedule(expression)
    start = datetime(2030, 1, 1, tzinfo=UTC)
    assert schedule.next_after(start + timedelta(seconds=1)) - (start + timedelta(seconds=1)) > timedelta(seconds=30)
