"""The records the router keeps about its own work: the inbound processed ledger, delta cursors and the outbound
ledger. Plain values shared by the services that write them and the Table adapters that store them.

They live in the domain (which imports only itself) so the layers point one way: ``core.services`` and
``core.adapters`` both import from here, and no adapter imports a service. The services re-export them under their
old names (``core.services.inbound.LedgerEntry``, ``core.services.outbound.LedgerEntry``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

__all__ = [
    "ActiveMarker",
    "DeltaCursor",
    "InboundLedgerEntry",
    "LedgerConflict",
    "LedgerOutcome",
    "OutboundLedgerEntry",
    "Phase",
]


# ------------------------------------------------------------------------------------------------ inbound


class LedgerOutcome(StrEnum):
    TRACKED = "tracked"
    ALREADY_TRACKED = "already_tracked"
    SKIPPED = "skipped"
    FAILED = "failed"
    GONE = "gone"
    RETRYING = "retrying"

    @property
    def terminal(self) -> bool:
        return self is not LedgerOutcome.RETRYING


@dataclass(frozen=True)
class InboundLedgerEntry:
    """What happened to one (mailbox, Graph message id)."""

    mailbox: str
    graph_id: str
    outcome: LedgerOutcome
    activity_id: str = ""
    internet_message_id: str = ""
    attempts: int = 0
    reason: str = ""
    at: datetime | None = None
    source: str = ""  # the work item's source that wrote it ("category": a track-by-category request)


@dataclass(frozen=True)
class DeltaCursor:
    mailbox: str
    folder: str
    link: str | None  # next link mid-round, delta link between rounds; None = start a new round
    high_water: datetime | None = None  # latest receivedDateTime seen
    round_started: datetime | None = None  # the receivedDateTime floor of the current sync state
    # During a first (filtered) round: messages reported so far and the oldest receivedDateTime among them, to
    # notice Graph's 5,000 cap; None once the round is complete.
    initial_seen: int | None = None
    initial_oldest: datetime | None = None


# ------------------------------------------------------------------------------------------------ outbound


class Phase(StrEnum):
    CLAIMED = "claimed"  # CRM claim held, nothing created in Exchange yet
    DRAFT = "draft"  # a draft exists (draft_id, internet_message_id); a send may have been attempted
    SENT = "sent"  # Graph accepted the send (or recovery proved it); CRM not yet marked
    DONE = "done"  # CRM marked Sent
    RETRY = "retry"  # transient failure: back to Pending Send, not before ``not_before``
    FAILED = "failed"  # CRM marked Failed; ``last_error`` says why


@dataclass(frozen=True)
class OutboundLedgerEntry:
    """The router's own record of one CRM email's outbound progress (survives crashes)."""

    email_id: str
    sender_mailbox: str
    phase: Phase
    attempts: int = 0  # delivery attempts made (email.deliveryattempts once written to CRM)
    owner: str = ""  # the worker holding the lease
    lease_until: datetime | None = None
    claimed_at: datetime | None = None
    draft_id: str = ""
    internet_message_id: str = ""
    draft_complete: bool = False  # every attachment is on the draft
    send_attempted_at: datetime | None = None
    not_before: datetime | None = None
    last_error: str = ""
    last_error_code: str = ""
    updated_at: datetime | None = None

    def leased(self, now: datetime) -> bool:
        return (self.phase in (Phase.CLAIMED, Phase.DRAFT) and self.lease_until is not None
                and self.lease_until > now)


@dataclass(frozen=True)
class ActiveMarker:
    """Index of emails the pipeline is working on: scan de-duplication and the reaper's ledger sweep."""

    email_id: str
    sender_mailbox: str
    enqueued_at: datetime | None = None
    not_before: datetime | None = None
    updated_at: datetime | None = None


class LedgerConflict(Exception):
    """A conditional ledger write lost: the entry changed (or exists / vanished) since it was read."""
