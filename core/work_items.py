"""Queue work items: compact, versioned JSON messages between the functions.

One inbound item per (mailbox, message); one outbound item per CRM email; one sync item per
(mailbox, folder) delta round. Parsing is strict: a malformed item raises ``InvalidWorkItem`` with a
reason, so the processor can poison it with that reason instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = [
    "REEVALUATE_OUTCOMES",
    "InboundItem",
    "InvalidWorkItem",
    "MailboxSyncItem",
    "OutboundItem",
]

_MAX_FIELD = 1024  # Graph ids are ~150 chars; anything longer is not ours

# "category": a user gave the message the org's tracking category in Outlook (track by category).
# "reprocess": an admin asked for an earlier decision to be made again (``emailrouter reprocess``).
InboundSource = Literal["notification", "delta", "backfill", "replay", "category", "reprocess"]
_SOURCES = ("notification", "delta", "backfill", "replay", "category", "reprocess")
# Earlier outcomes a re-evaluation may overrule (``emailrouter reprocess``, ``backfill --reevaluate``).
REEVALUATE_OUTCOMES = ("skipped", "failed")


class InvalidWorkItem(ValueError):
    """A queue message that is not a well-formed work item (reason in the message)."""


def _load(raw: str | bytes, kind: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidWorkItem(f"not JSON: {exc.__class__.__name__}") from None
    if not isinstance(data, dict):
        raise InvalidWorkItem("not a JSON object")
    if data.get("v") != 1:
        raise InvalidWorkItem(f"unsupported version {data.get('v')!r}")
    if data.get("kind") != kind:
        raise InvalidWorkItem(f"expected kind {kind!r}, got {data.get('kind')!r}")
    return data


def _str(data: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > _MAX_FIELD:
        raise InvalidWorkItem(f"field {key!r} missing or invalid")
    return value


def _dump(kind: str, payload: dict[str, Any]) -> str:
    return json.dumps({"v": 1, "kind": kind, **payload}, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class InboundItem:
    """A message to fetch and track: which mailbox, which Graph message id, and where it came from."""

    mailbox: str  # mailbox address (UPN) or Graph user id
    message_id: str  # Graph message id (ImmutableId where we asked for it)
    source: InboundSource
    folder: str = ""  # well-known name or folder id the message was seen in, if known
    subscription_id: str = ""
    change_type: str = "created"
    # A re-evaluation: the earlier outcomes (comma-separated, of REEVALUATE_OUTCOMES) this item may overrule, and
    # when it was asked for (ISO 8601). A ledger entry written after that moment is the re-evaluation itself (the
    # item was delivered twice): then it is a duplicate like any other.
    reevaluate: str = ""
    requested_at: str = ""

    def to_json(self) -> str:
        payload = asdict(self)
        for name in ("reevaluate", "requested_at"):  # absent unless used: items stay as small as they were
            if not payload[name]:
                del payload[name]
        return _dump("inbound", payload)

    @property
    def reevaluates(self) -> frozenset[str]:
        return frozenset(o for o in self.reevaluate.split(",") if o)

    @classmethod
    def from_json(cls, raw: str | bytes) -> InboundItem:
        data = _load(raw, "inbound")
        source = _str(data, "source")
        if source not in _SOURCES:
            raise InvalidWorkItem(f"unknown source {source!r}")
        reevaluate = _str(data, "reevaluate", required=False)
        if any(o not in REEVALUATE_OUTCOMES for o in reevaluate.split(",") if o):
            raise InvalidWorkItem(f"field 'reevaluate' has an unknown outcome: {reevaluate!r}")
        return cls(
            mailbox=_str(data, "mailbox"),
            message_id=_str(data, "message_id"),
            source=source,  # type: ignore[arg-type]
            folder=_str(data, "folder", required=False),
            subscription_id=_str(data, "subscription_id", required=False),
            change_type=_str(data, "change_type", required=False) or "created",
            reevaluate=reevaluate,
            requested_at=_str(data, "requested_at", required=False),
        )


@dataclass(frozen=True)
class OutboundItem:
    """A CRM email (activityid) in Pending Send to send through its sender's mailbox."""

    email_id: str
    sender_mailbox: str
    scan_id: str = ""

    def to_json(self) -> str:
        return _dump("outbound", asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> OutboundItem:
        data = _load(raw, "outbound")
        return cls(
            email_id=_str(data, "email_id"),
            sender_mailbox=_str(data, "sender_mailbox"),
            scan_id=_str(data, "scan_id", required=False),
        )


@dataclass(frozen=True)
class MailboxSyncItem:
    """Run a delta round (or resubscribe) for one mailbox, e.g. after a lifecycle event."""

    mailbox: str
    reason: Literal["missed", "subscriptionRemoved", "reauthorizationRequired", "timer", "manual", "hot"]
    subscription_id: str = ""
    folder: str = ""  # the lifecycle event's subscription folder: only that folder needs a delta round

    def to_json(self) -> str:
        return _dump("mailbox-sync", asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> MailboxSyncItem:
        data = _load(raw, "mailbox-sync")
        reason = _str(data, "reason")
        if reason not in ("missed", "subscriptionRemoved", "reauthorizationRequired", "timer", "manual", "hot"):
            raise InvalidWorkItem(f"unknown reason {reason!r}")
        return cls(
            mailbox=_str(data, "mailbox"),
            reason=reason,  # type: ignore[arg-type]
            subscription_id=_str(data, "subscription_id", required=False),
            folder=_str(data, "folder", required=False),
        )
