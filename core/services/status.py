"""One read-only snapshot of the router's state: what ``emailrouter status`` prints and ``/api/status`` renders.

Reads only storage (settings and status tables, the decision and outbound indexes, queue depths), so the page
works while Graph or Dataverse is the thing that is down. Every read is bounded: one partition per table, the
decision index for the last hour (one or two day partitions, a RowKey range each), the outbound finished index
for the last day.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from core.names import ALL_QUEUES, MAILBOX_STATUS_TABLE, POISON_SUFFIX, QUEUES

if TYPE_CHECKING:
    from core.bootstrap import Container

__all__ = ["MailboxLine", "OutboundFailure", "StatusReport", "collect_status"]

HEALTH_ORDER = {"failing": 0, "pending": 1, "unknown": 2, "ok": 3, "n/a": 4}
KINDS = ("tracked", "already_tracked", "skipped", "failed", "gone")


@dataclass(frozen=True)
class MailboxLine:
    address: str
    kind: str
    inbound: str
    outbound: str
    health: str
    last_probe: str
    last_error: str  # the health probe's failing checks
    pending: str  # what a pending mailbox waits for (its first subscription ...)
    inbound_error: str
    inbound_error_at: str
    outbound_error: str
    outbound_error_at: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class OutboundFailure:
    email_id: str
    sender: str
    reason: str
    attempts: int
    at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StatusReport:
    at: datetime
    window: timedelta
    mailboxes: list[MailboxLine] = field(default_factory=list)
    ignored_rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # decisions in the window by kind
    skip_reasons: list[tuple[str, int, str]] = field(default_factory=list)  # (code, count, an example "why")
    queues: dict[str, int | None] = field(default_factory=dict)
    poison: dict[str, int | None] = field(default_factory=dict)
    outbound_failures: list[OutboundFailure] = field(default_factory=list)  # the last day, newest first
    outbound_window: dict[str, int] = field(default_factory=dict)  # {"done": n, "failed": n} in the window
    outbound_in_flight: int = 0
    last_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    running: list[str] = field(default_factory=list)  # jobs holding their lease now, described

    @property
    def by_health(self) -> dict[str, int]:
        return dict(Counter(m.health for m in self.mailboxes))

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at, "window_minutes": int(self.window.total_seconds() // 60),
            "mailboxes": {"total": len(self.mailboxes), "by_health": self.by_health,
                          "failing": [m.address for m in self.mailboxes if m.health == "failing"],
                          "pending": [m.address for m in self.mailboxes if m.health == "pending"],
                          "ignored_rows": self.ignored_rows, "list": [m.to_json() for m in self.mailboxes]},
            "inbound": {"counts": self.counts,
                        "skip_reasons": [{"reason": c, "count": n, "example": w} for c, n, w in self.skip_reasons]},
            "queues": self.queues, "poison": self.poison,
            "outbound": {"in_flight": self.outbound_in_flight, "window": self.outbound_window,
                         "failures": [f.to_json() for f in self.outbound_failures]},
            "last_runs": self.last_runs, "running": self.running,
        }


def _text(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "" if value is None else str(value)


async def _queue_depths(container: Container) -> dict[str, int | None]:
    depths: dict[str, int | None] = {}
    service = container.storage.queue_service
    for name in ALL_QUEUES:
        client = service.get_queue_client(name)
        try:
            props = await client.get_queue_properties()
            depths[name] = int(props.approximate_message_count or 0)
        except Exception:  # not created yet (first start) or not reachable: shown as "-"
            depths[name] = None
        finally:
            await client.close()
    return depths


async def collect_status(container: Container, *, now: datetime | None = None,
                         window: timedelta = timedelta(hours=1), failures_since: timedelta = timedelta(days=1),
                         max_failures: int = 50) -> StatusReport:
    from core.adapters.inbound_state import InboundState
    from core.adapters.outbound_state import TableOutboundLedger
    from core.settings.rows import row_key

    now = now or datetime.now(UTC)
    report = StatusReport(at=now, window=window)
    directory = container.mailbox_directory
    mailboxes = await directory.list_mailboxes()
    report.ignored_rows = len(await directory.row_errors())
    status_table = container.storage.table(MAILBOX_STATUS_TABLE)
    rows = {str(r.get("RowKey")): dict(r) async for r in status_table.list_partition("mailbox")}
    for m in mailboxes:
        row = rows.get(row_key(m.address)) or {}
        report.mailboxes.append(MailboxLine(
            address=m.address, kind=m.kind.value, inbound=m.inbound_method.name.lower(),
            outbound=m.outbound_method.name.lower(), health=str(row.get("Health") or "unknown"),
            last_probe=_text(row, "LastProbeOn"), last_error=_text(row, "LastError"),
            pending=_text(row, "PendingReason") if row.get("Health") == "pending" else "",
            inbound_error=_text(row, "InboundLastError"), inbound_error_at=_text(row, "InboundLastErrorAt"),
            outbound_error=_text(row, "LastOutboundError"), outbound_error_at=_text(row, "LastOutboundErrorAt")))
    report.mailboxes.sort(key=lambda m: (HEALTH_ORDER.get(m.health, 9), m.address))
    synced = [r["InboundLastSyncAt"] for r in rows.values() if isinstance(r.get("InboundLastSyncAt"), datetime)]
    if synced:
        report.last_runs["inbound-last-sync"] = {"LastRunOn": max(synced)}
    async for row in status_table.list_partition("router"):
        report.last_runs[str(row.get("RowKey"))] = {k: v for k, v in row.items() if k not in ("PartitionKey",
                                                                                            "RowKey")}

    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    async for hit in InboundState.for_container(container).decisions.search(now - window, now):
        counts[hit.kind] += 1
        if hit.kind == "skipped":
            reasons[hit.code] += 1
            examples.setdefault(hit.code, hit.why)
    report.counts = {k: counts.get(k, 0) for k in KINDS}
    report.skip_reasons = [(code, n, examples.get(code, "")) for code, n in reasons.most_common(10)]

    depths = await _queue_depths(container)
    report.queues = {q: depths.get(q) for q in QUEUES}
    report.poison = {q + POISON_SUFFIX: depths.get(q + POISON_SUFFIX) for q in QUEUES}

    ledger = TableOutboundLedger(container.storage)
    report.outbound_in_flight = len(await ledger.list_active())
    window_counts: Counter[str] = Counter()
    async for row in ledger.list_finished(now - max(window, failures_since), now):
        at = row.get("At") if isinstance(row.get("At"), datetime) else None
        phase = str(row.get("Phase", ""))
        if at is not None and at >= now - window:
            window_counts[phase] += 1
        if phase == "failed" and len(report.outbound_failures) < max_failures:
            report.outbound_failures.append(OutboundFailure(
                email_id=str(row.get("EmailId", "")), sender=str(row.get("SenderMailbox", "")),
                reason=str(row.get("LastError", "")), attempts=int(row.get("Attempts", 0) or 0), at=at))
    report.outbound_window = {"done": window_counts.get("done", 0), "failed": window_counts.get("failed", 0)}
    from core.domain.leases import describe_holder
    from core.services.jobs import lease_store_for

    try:
        report.running = [describe_holder(lease, now).removeprefix("another ")
                          for lease in await lease_store_for(container).list_held("job/")]
    except Exception:  # the Leases table does not exist before the first job ran
        report.running = []
    return report
