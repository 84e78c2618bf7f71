"""Retention: the router's own records do not grow forever (the ``delta_catchup`` timer runs it every
``RetentionIntervalMinutes``; by hand ``emailrouter retention run``).

One run, under the retention job's lease, deletes at most ``budget`` rows or messages (``RETENTION_MAX_DELETES``),
oldest first; what is left waits for the next run (the report says so):

1. **Decision records and their index** (``Decisions``, ``DecisionIndex``) decided more than ``RetentionDays`` ago
   (whole UTC days): the oldest index day partition is found with one range read and worked through; each record
   goes with its Message-ID index rows. Records from before the index existed are found by a bounded scan once no
   older index day is left.
2. **The outbound finished index** (``Outbound``, ``done<day>`` partitions) older than ``RetentionDays``. The
   per-email outbound state rows stay: they are what stops a second send.
3. **The processed ledger** (``Processed``), per mailbox: rows older than ``RetentionDays`` *and* older than the
   moment delta can no longer report their messages again (:func:`ledger_horizon`) - the ledger is what makes a
   redelivered notification or a delta re-report a duplicate instead of a second decision.
4. **Processed forward wrappers**: wrappers the processor moved to a forward mailbox's processed folder more than
   ``ProcessedWrapperDays`` ago are deleted (0 = kept). The undeliverable folder is left to the admin.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol

from core.adapters.graph import GraphError, GraphNotFound
from core.domain.leases import JOB_RETENTION, new_owner
from core.domain.model import MailboxKind
from core.ports import MailboxDirectory
from core.services.delta import LATE_ARRIVAL_SLACK, DeltaCursor
from core.services.jobs import LeaseStore, exclusive

if TYPE_CHECKING:
    from core.bootstrap import Container

__all__ = ["RetentionReport", "RetentionService", "ledger_horizon", "retention_service_for", "run_retention_if_due"]

log = logging.getLogger("emailrouter.retention")

# A delta round that restarts (its sync state expired) reads again from its high-water mark minus this
# (core.services.delta.LATE_ARRIVAL_SLACK); the margin adds Graph's notification retries (up to 4 hours) and the
# processor's own delayed retries on top, with room to spare.
REDELIVERY_MARGIN: Final = timedelta(days=1)
RETENTION_RUN: Final = "retention"  # its row in the MailboxStatus "router" partition
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def ledger_horizon(cursors: Sequence[DeltaCursor], *, change_type_all: bool, now: datetime,
                   margin: timedelta = REDELIVERY_MARGIN) -> datetime:
    """Ledger rows of a mailbox written before the returned moment can go: delta cannot report their messages
    again. Pure.

    A message's ledger row is written after it was received, so a row older than the moment is about a message
    received before it. With ``changeType=created`` (the default) delta reports a message once, when it arrives; it
    reports it again only when a round restarts after its token expired, and a restarted round reads from the
    folder's high-water mark minus a few minutes (the round's floor, while no message was seen yet). With
    ``DELTA_CHANGE_TYPE=all`` every change re-reports a message received after the current round's floor, as long
    as that round's delta link lives: the floor is the horizon. A mailbox without delta cursors is not read by
    delta at all. Each point is moved back by ``margin`` for notification retries and the processor's retries."""
    points: list[datetime] = []
    for cursor in cursors:
        if change_type_all:
            points.append(cursor.round_started or _EPOCH)
        elif cursor.high_water is not None:
            points.append(_aware(cursor.high_water) - LATE_ARRIVAL_SLACK)
        else:
            points.append(_aware(cursor.round_started) if cursor.round_started else _EPOCH)
    return min([now, *(_aware(p) for p in points)]) - margin


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _day(partition: str, prefix: str) -> datetime | None:
    try:
        return datetime.strptime(partition[len(prefix):], "%Y%m%d").replace(tzinfo=UTC)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------ ports


class DecisionStore(Protocol):
    async def oldest_day(self) -> str | None: ...

    async def expire_day(self, day: str, before: datetime, limit: int) -> tuple[int, int, bool]: ...

    async def expire_unindexed(self, before: datetime, limit: int) -> tuple[int, bool]: ...


class LedgerStore(Protocol):
    async def expire(self, mailbox: str, before: datetime, limit: int) -> tuple[int, bool]: ...


class CursorStore(Protocol):
    async def list_mailbox(self, mailbox: str) -> list[DeltaCursor]: ...


class FinishedIndex(Protocol):
    async def oldest_finished_day(self) -> str | None: ...

    async def expire_finished_day(self, day: str, limit: int) -> tuple[int, bool]: ...


class WrapperMail(Protocol):
    async def list_mail_folders(self, mailbox: str, parent: str | None = None) -> list[dict[str, Any]]: ...

    def list_messages(self, mailbox: str, folder: str, *, received_after: datetime | None = None,
                      received_before: datetime | None = None, page_size: int = 50
                      ) -> AsyncIterator[dict[str, Any]]: ...

    async def delete_message(self, mailbox: str, message_id: str) -> None: ...


# ------------------------------------------------------------------------------------------------ the service


@dataclass
class RetentionReport:
    cutoff: datetime
    budget: int
    decisions: int = 0
    index_rows: int = 0
    outbound_rows: int = 0
    ledger_rows: int = 0
    wrappers: int = 0
    ledger_held: dict[str, datetime] = field(default_factory=dict)  # mailbox -> horizon, when it holds rows back
    more: bool = False  # the budget ran out: the next run continues
    errors: list[str] = field(default_factory=list)

    @property
    def deleted(self) -> int:
        return self.decisions + self.index_rows + self.outbound_rows + self.ledger_rows + self.wrappers

    def to_json(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff, "budget": self.budget, "deleted": self.deleted, "decisions": self.decisions,
                "index_rows": self.index_rows, "outbound_rows": self.outbound_rows, "ledger_rows": self.ledger_rows,
                "wrappers": self.wrappers, "more": self.more, "errors": self.errors,
                "ledger_held_until": {m: t for m, t in sorted(self.ledger_held.items())}}


class RunLog(Protocol):
    """Where the last run is noted (the ``router/retention`` row of MailboxStatus: ``emailrouter status`` shows it)."""

    async def upsert(self, entity: dict[str, Any], *, mode: Any = "merge") -> str: ...

    async def get(self, partition_key: str, row_key: str) -> Any: ...


class RetentionService:
    def __init__(self, *, decisions: DecisionStore, ledger: LedgerStore, cursors: CursorStore,
                 outbound: FinishedIndex, mailboxes: MailboxDirectory, mail: WrapperMail | None = None,
                 leases: LeaseStore | None = None, owner: str | None = None, budget: int = 5000,
                 change_type_all: bool = False, runs: RunLog | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._runs = runs
        self._decisions = decisions
        self._ledger = ledger
        self._cursors = cursors
        self._outbound = outbound
        self._mailboxes = mailboxes
        self._mail = mail
        self._leases = leases
        self._owner = owner or new_owner("retention")
        self._budget = max(1, budget)
        self._change_type_all = change_type_all
        self._clock = clock

    async def run(self, *, wait: float = 0.0, on_wait: Callable[[str], None] | None = None) -> RetentionReport:
        async with exclusive(self._leases, JOB_RETENTION, owner=self._owner, wait=wait, on_wait=on_wait):
            report = await self._run()
        if self._runs is not None:
            await self._runs.upsert({"PartitionKey": "router", "RowKey": RETENTION_RUN,
                                     "LastRunOn": self._clock().isoformat(), "Deleted": report.deleted,
                                     "More": report.more, "Cutoff": report.cutoff.isoformat()}, mode="merge")
        return report

    async def due(self) -> bool:
        """Whether ``RetentionIntervalMinutes`` have passed since the last run (or none ran yet)."""
        if self._runs is None:
            return True
        try:
            row = await self._runs.get("router", RETENTION_RUN)
            last = datetime.fromisoformat(str(row.get("LastRunOn")))
        except (KeyError, ValueError, TypeError):
            return True
        router = await self._mailboxes.get_router_settings()
        interval = timedelta(minutes=router.retention_interval_minutes) - timedelta(seconds=30)
        return self._clock() - (last if last.tzinfo else last.replace(tzinfo=UTC)) >= interval

    async def _run(self) -> RetentionReport:
        now = self._clock()
        router = await self._mailboxes.get_router_settings()
        # Whole UTC days: a day partition is deleted once all of it is older than RetentionDays.
        cutoff = (now - timedelta(days=router.retention_days)).replace(hour=0, minute=0, second=0, microsecond=0)
        report = RetentionReport(cutoff=cutoff, budget=self._budget)
        steps = (self._decision_records, self._outbound_index, self._processed_ledger, self._processed_wrappers)
        for step in steps:
            if self._left(report) <= 0:
                report.more = True
                break
            await step(report, now, router)
        log.info("retention: %d deleted (decisions %d, index rows %d, outbound rows %d, ledger rows %d, wrappers "
                 "%d)%s", report.deleted, report.decisions, report.index_rows, report.outbound_rows,
                 report.ledger_rows, report.wrappers, "; more next run" if report.more else "")
        return report

    def _left(self, report: RetentionReport) -> int:
        return self._budget - report.deleted

    async def _decision_records(self, report: RetentionReport, now: datetime, router: Any) -> None:
        while self._left(report) > 0:
            day = await self._decisions.oldest_day()
            when = _day(day, "t") if day else None
            if day is None or when is None or when >= report.cutoff:
                break
            records, rows, more = await self._decisions.expire_day(day, report.cutoff, self._left(report))
            report.decisions += records
            report.index_rows += rows
            if more:
                report.more = True
                return
        if self._left(report) > 0:
            deleted, more = await self._decisions.expire_unindexed(report.cutoff, self._left(report))
            report.decisions += deleted
            report.more = report.more or more

    async def _outbound_index(self, report: RetentionReport, now: datetime, router: Any) -> None:
        while self._left(report) > 0:
            day = await self._outbound.oldest_finished_day()
            when = _day(day, "done") if day else None
            if day is None or when is None or when >= report.cutoff:
                return
            deleted, more = await self._outbound.expire_finished_day(day, self._left(report))
            report.outbound_rows += deleted
            if more:
                report.more = True
                return

    async def _processed_ledger(self, report: RetentionReport, now: datetime, router: Any) -> None:
        for mailbox in sorted(m.address for m in await self._mailboxes.list_mailboxes()):
            if self._left(report) <= 0:
                report.more = True
                return
            horizon = ledger_horizon(await self._cursors.list_mailbox(mailbox), change_type_all=self._change_type_all,
                                     now=now)
            before = min(report.cutoff, horizon)
            if horizon < report.cutoff:
                report.ledger_held[mailbox] = horizon
            deleted, more = await self._ledger.expire(mailbox, before, self._left(report))
            report.ledger_rows += deleted
            report.more = report.more or more

    async def _processed_wrappers(self, report: RetentionReport, now: datetime, router: Any) -> None:
        if self._mail is None or router.processed_wrapper_days <= 0 or not router.processed_folder:
            return
        before = now - timedelta(days=router.processed_wrapper_days)
        wanted = router.processed_folder.strip().lower()
        for sink in await self._mailboxes.list_mailboxes():
            if sink.kind is not MailboxKind.FORWARD_SINK:
                continue
            try:
                folders = await self._mail.list_mail_folders(sink.address, "inbox")
                folder = next((str(f["id"]) for f in folders
                               if str(f.get("displayName", "")).strip().lower() == wanted), None)
                if folder is None:
                    continue
                async for message in self._mail.list_messages(sink.address, folder, received_before=before):
                    if self._left(report) <= 0:
                        report.more = True
                        return
                    if message.get("id"):
                        await self._mail.delete_message(sink.address, str(message["id"]))
                        report.wrappers += 1
            except GraphNotFound:
                continue
            except GraphError as exc:
                report.errors.append(f"{sink.address}: processed wrappers not purged ({exc.status} {exc.code})")
                log.warning("retention: processed wrappers of a forward mailbox not purged (%s %s)", exc.status,
                            exc.code)


# ------------------------------------------------------------------------------------------------ wiring


def retention_service_for(container: Container, *, role: str = "timer") -> RetentionService:
    from core.adapters.inbound_state import InboundState
    from core.adapters.outbound_state import TableOutboundLedger
    from core.names import MAILBOX_STATUS_TABLE
    from core.services.jobs import lease_store_for

    state = InboundState.for_container(container)
    change_type = container.settings.raw("DELTA_CHANGE_TYPE").strip().lower()
    return RetentionService(
        decisions=state.decisions, ledger=state.ledger, cursors=state.delta,
        outbound=TableOutboundLedger(container.storage), mailboxes=container.mailbox_directory,
        mail=container.graph, leases=lease_store_for(container), owner=new_owner(role),
        budget=container.settings.integer("RETENTION_MAX_DELETES", minimum=1), change_type_all=change_type == "all",
        runs=container.storage.table(MAILBOX_STATUS_TABLE))


async def run_retention_if_due(container: Container) -> RetentionReport | None:
    """The delta catch-up timer's retention step: a run when ``RetentionIntervalMinutes`` have passed (None
    otherwise). :class:`core.services.jobs.JobBusy` when another run holds the job."""
    service = retention_service_for(container, role="timer")
    if not await service.due():
        return None
    return await service.run()
