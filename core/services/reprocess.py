"""Re-evaluate mail the router skipped or failed, after an admin changed what decides it (a tracking filter, an
approval, a tracked folder, "process email received after", an org setting): ``emailrouter reprocess``.

The messages come from the decision index (``core.adapters.inbound_state``: every decision of the window, newest
first), so nothing is listed from Graph and mail already tracked is never touched. Each message whose *latest*
decision is one of the asked outcomes goes back on the inbound queue as an :class:`~core.work_items.InboundItem`
with ``source="reprocess"``, the outcomes it may overrule and the moment it was asked for; the processor decides it
again through the normal pipeline with today's settings (``core.services.inbound.reevaluation_allowed``). The
result is exactly one CRM email at most: the activity id is derived from the Message-ID and the Message-ID is
looked up in CRM first.

A forward sink's wrapper must still exist to be decided again: with ``DeleteAfterProcessing`` it is gone (the
default moves processed wrappers to a folder instead, see ``core.services.retention``); such messages end "gone".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from core.names import INBOUND_QUEUE
from core.work_items import REEVALUATE_OUTCOMES, InboundItem

if TYPE_CHECKING:
    from core.adapters.inbound_state import DecisionHit
    from core.bootstrap import Container

__all__ = ["ReprocessReport", "reprocess", "reprocess_items"]

ENQUEUE_CHUNK: Final = 64


@dataclass
class ReprocessReport:
    mailbox: str | None
    since: datetime
    outcomes: tuple[str, ...]
    requested_at: datetime
    by_outcome: Counter[str] = field(default_factory=Counter)  # "skipped:not_accepted" -> n
    items: list[dict[str, Any]] = field(default_factory=list)  # what was (or, with dry_run, would be) queued
    enqueued: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"mailbox": self.mailbox, "since": self.since, "outcomes": list(self.outcomes),
                "requested_at": self.requested_at, "enqueued": self.enqueued,
                "by_outcome": dict(self.by_outcome.most_common()), "items": self.items}


def _contains(text: str, needle: str | None) -> bool:
    return not needle or needle.strip().lower() in text.lower()


def reprocess_items(hits: Iterable[DecisionHit], outcomes: Sequence[str], requested_at: datetime
                    ) -> list[tuple[DecisionHit, InboundItem]]:
    """The work items for decision index hits (newest first). Pure. A message decided several times counts by its
    latest decision: a message skipped last week and tracked today is left alone."""
    wanted = frozenset(outcomes)
    seen: set[tuple[str, str]] = set()
    out: list[tuple[DecisionHit, InboundItem]] = []
    stamp = requested_at.astimezone(UTC).isoformat()
    for hit in hits:
        key = (hit.mailbox.lower(), hit.graph_id)
        if key in seen or not hit.graph_id or not hit.mailbox:
            continue
        seen.add(key)
        if hit.kind not in wanted:
            continue
        out.append((hit, InboundItem(hit.mailbox, hit.graph_id, "reprocess", folder=hit.folder,
                                     reevaluate=",".join(o for o in REEVALUATE_OUTCOMES if o in wanted),
                                     requested_at=stamp)))
    return out


async def reprocess(container: Container, mailbox: str | None, since: datetime, *,
                    outcomes: Sequence[str] = REEVALUATE_OUTCOMES, sender: str | None = None,
                    subject: str | None = None, dry_run: bool = False, now: datetime | None = None,
                    on_day: Callable[[int, int], None] | None = None) -> ReprocessReport:
    """Queue the re-evaluation of ``mailbox``'s (None: every mailbox's) skipped/failed mail decided since ``since``
    (only mail whose sender / subject contains ``sender`` / ``subject``, when given). A forward user's address finds
    the mail unwrapped for them in the sink."""
    from core.adapters.inbound_state import InboundState

    unknown = [o for o in outcomes if o not in REEVALUATE_OUTCOMES]
    if unknown or not outcomes:
        raise ValueError(f"outcomes must be among {', '.join(REEVALUATE_OUTCOMES)}, got {list(outcomes)}")
    requested_at = now or datetime.now(UTC)
    report = ReprocessReport(mailbox, since, tuple(outcomes), requested_at)
    decisions = InboundState.for_container(container).decisions
    hits = [hit async for hit in decisions.search(since, requested_at, mailbox=mailbox, on_day=on_day)
            if _contains(hit.sender, sender) and _contains(hit.subject, subject)]
    planned = reprocess_items(hits, outcomes, requested_at)
    for hit, _ in planned:
        report.by_outcome[hit.outcome] += 1
        report.items.append({"mailbox": hit.mailbox, "tracked_for": hit.tracked_for, "from": hit.sender,
                             "subject": hit.subject, "outcome": hit.outcome, "decided_at": hit.at})
    if dry_run:
        return report
    messages = [item.to_json() for _, item in planned]
    for start in range(0, len(messages), ENQUEUE_CHUNK):
        await container.work_queue.send_many(INBOUND_QUEUE, messages[start:start + ENQUEUE_CHUNK])
        report.enqueued += len(messages[start:start + ENQUEUE_CHUNK])
    return report
