"""Correlation: is this message part of a conversation CRM already tracks? (crm-ref §6)

Order (first match wins, each method switchable by org settings, crm-ref §6.1/§6.2/§10):

1. In-Reply-To = ``messageid`` of a CRM email  (SSS "InReplyTo", correlationmethod 3)
2. References, newest first, last 32 ids       (router extension after Odoo, style-anchors §3; reported as 3)
3. Tracking token in the subject               (SSS "TrackingToken", correlationmethod 4)
4. Conversation index: own index, then parents (SSS "ConversationIndex", correlationmethod 5)

The service asks :func:`correlation_keys` what to look up (all keys at once), queries CRM (or its own ledger), and
passes the hits back as a :class:`CorrelationLookup`; :func:`correlate` is pure.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

from core.domain.identity import activity_id_for, canonical_message_id
from core.domain.model import CrmRecordRef, MailMessage, OrgEmailSettings

__all__ = [
    "MAX_REFERENCES",
    "Correlation",
    "CorrelationKeys",
    "CorrelationLookup",
    "CorrelationMethod",
    "KnownEmail",
    "conversation_index_key",
    "correlate",
    "correlation_keys",
    "find_tracking_tokens",
    "is_forward",
]

MAX_REFERENCES: Final = 32  # Odoo: msg_references[-32:] (style-anchors §3)
_CONVERSATION_HEADER_BYTES: Final = 22  # Outlook conversation index: 22-byte header, then 5 bytes per reply
_CONVERSATION_CHILD_BYTES: Final = 5


class CorrelationMethod(StrEnum):
    NONE = "none"
    IN_REPLY_TO = "in_reply_to"
    REFERENCES = "references"
    TRACKING_TOKEN = "tracking_token"  # noqa: S105 - a method name, not a secret
    CONVERSATION_INDEX = "conversation_index"

    @property
    def crm_code(self) -> int:
        """email.correlationmethod (dv-ref §2.1): 0 None, 3 InReplyTo, 4 TrackingToken, 5 ConversationIndex.
        References is a Message-ID header match like In-Reply-To, so it reports as 3 (CRM has no own value)."""
        return {
            CorrelationMethod.NONE: 0,
            CorrelationMethod.IN_REPLY_TO: 3,
            CorrelationMethod.REFERENCES: 3,
            CorrelationMethod.TRACKING_TOKEN: 4,
            CorrelationMethod.CONVERSATION_INDEX: 5,
        }[self]

    @property
    def sets_parent(self) -> bool:
        # crm-ref §6.1: "parentactivityid only for InReplyTo/ConversationIndex (empty for tokens)".
        return self in (CorrelationMethod.IN_REPLY_TO, CorrelationMethod.REFERENCES,
                        CorrelationMethod.CONVERSATION_INDEX)


@dataclass(frozen=True, slots=True)
class KnownEmail:
    """A CRM email the lookup found (or the router's own ledger of emails it created)."""

    activity_id: uuid.UUID
    regarding: CrmRecordRef | None = None
    owner: CrmRecordRef | None = None
    sent_on: datetime | None = None
    # The navigation property its regarding is bound through (Microsoft.Dynamics.CRM.associatednavigationproperty).
    regarding_nav: str | None = None


@dataclass(frozen=True, slots=True)
class CorrelationKeys:
    """What to look up, all at once: ``message_ids`` in canonical ``<id>`` form (In-Reply-To first, then References
    newest first), ``tracking_tokens`` (last in the subject first), ``conversation_indexes`` (base64; own index
    first, then ancestors nearest first)."""

    message_ids: tuple[str, ...] = ()
    tracking_tokens: tuple[str, ...] = ()
    conversation_indexes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.message_ids or self.tracking_tokens or self.conversation_indexes)


@dataclass(frozen=True)
class CorrelationLookup:
    by_message_id: Mapping[str, KnownEmail]
    by_tracking_token: Mapping[str, KnownEmail]
    by_conversation_index: Mapping[str, KnownEmail]

    @staticmethod
    def empty() -> CorrelationLookup:
        return CorrelationLookup({}, {}, {})


@dataclass(frozen=True, slots=True)
class Correlation:
    method: CorrelationMethod
    matched: KnownEmail | None = None
    key: str | None = None  # the id / token / index that matched
    tracking_token: str | None = None  # first token found in the subject, matched or not (email.trackingtoken)

    @property
    def found(self) -> bool:
        return self.matched is not None

    @property
    def regarding(self) -> CrmRecordRef | None:
        # crm-ref §6.1: a correlated email gets "the same value as the already tracked email" for Regarding.
        return self.matched.regarding if self.matched else None

    @property
    def parent_activity_id(self) -> uuid.UUID | None:
        return self.matched.activity_id if self.matched and self.method.sets_parent else None


def conversation_index_key(index: bytes) -> str:
    return base64.b64encode(index).decode("ascii")


def _token_pattern(org: OrgEmailSettings) -> re.Pattern[str] | None:
    prefixes = [p for p in org.tracking_prefixes if p]
    if not prefixes:
        return None
    alternatives = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
    # prefix + exactly N digits, not glued to more digits (a longer number is not our token).
    return re.compile(rf"(?<![0-9A-Za-z])({alternatives})(\d{{{org.token_digits}}})(?!\d)", re.IGNORECASE)


def find_tracking_tokens(subject: str, org: OrgEmailSettings) -> tuple[str, ...]:
    """Tokens in the subject, last first (CRM appends the token; "RE: ... CRM:0001234" keeps the newest last).
    The prefix is returned as configured (a user may have re-cased it while editing the subject)."""
    pattern = _token_pattern(org)
    if pattern is None:
        return ()
    canonical = {p.lower(): p for p in org.tracking_prefixes}
    found = [f"{canonical.get(m.group(1).lower(), m.group(1))}{m.group(2)}" for m in pattern.finditer(subject)]
    unique: list[str] = []
    for token in reversed(found):
        if token not in unique:
            unique.append(token)
    return tuple(unique)


def is_forward(message: MailMessage, org: OrgEmailSettings) -> bool:
    subject = message.subject.lstrip().lower()
    return any(subject.startswith(prefix) for prefix in org.forward_subject_prefixes)


def _header_methods_allowed(message: MailMessage, org: OrgEmailSettings) -> bool:
    if not org.use_correlation or org.ignore_conversation_index_and_in_reply_to:
        return False
    # DoNotCorrelateForwardedEmailsAsReplies (crm-ref §10): forwards carry In-Reply-To and would otherwise be
    # correlated as replies.
    return not (org.do_not_correlate_forwards_as_replies and is_forward(message, org))


def _conversation_keys(index: bytes | None) -> tuple[str, ...]:
    if not index or len(index) < _CONVERSATION_HEADER_BYTES:
        return ()
    keys = [conversation_index_key(index)]  # SSS: "equal to an existing email's" (crm-ref §6.1)
    length = len(index) - _CONVERSATION_CHILD_BYTES
    while length >= _CONVERSATION_HEADER_BYTES:  # then the parent, grandparent, ... (each reply adds 5 bytes)
        keys.append(conversation_index_key(index[:length]))
        length -= _CONVERSATION_CHILD_BYTES
    return tuple(keys)


def correlation_keys(message: MailMessage, org: OrgEmailSettings) -> CorrelationKeys:
    message_ids: list[str] = []
    conversation: tuple[str, ...] = ()
    if _header_methods_allowed(message, org):
        if message.in_reply_to:
            message_ids.append(canonical_message_id(message.in_reply_to))
        if org.use_references:
            for reference in reversed(message.references[-MAX_REFERENCES:]):
                canonical = canonical_message_id(reference)
                if canonical not in message_ids:
                    message_ids.append(canonical)
        conversation = _conversation_keys(message.conversation_index)
    tokens = find_tracking_tokens(message.subject, org) if org.use_tracking_token else ()
    return CorrelationKeys(tuple(message_ids), tokens, conversation)


def correlate(message: MailMessage, lookup: CorrelationLookup, org: OrgEmailSettings) -> Correlation:
    keys = correlation_keys(message, org)
    all_tokens = find_tracking_tokens(message.subject, org)
    token = all_tokens[0] if all_tokens else None
    in_reply_to = canonical_message_id(message.in_reply_to) if message.in_reply_to else None
    for key in keys.message_ids:
        hit = lookup.by_message_id.get(key)
        if hit is not None:
            method = CorrelationMethod.IN_REPLY_TO if key == in_reply_to else CorrelationMethod.REFERENCES
            return Correlation(method, hit, key, token)
    for key in keys.tracking_tokens:
        hit = lookup.by_tracking_token.get(key)
        if hit is not None:
            return Correlation(CorrelationMethod.TRACKING_TOKEN, hit, key, token)
    own = keys.conversation_indexes[0] if keys.conversation_indexes else None
    for key in keys.conversation_indexes:
        hit = lookup.by_conversation_index.get(key)
        if hit is not None and not (key == own and _is_self(hit, message)):
            return Correlation(CorrelationMethod.CONVERSATION_INDEX, hit, key, token)
    return Correlation(CorrelationMethod.NONE, None, None, token)


def _is_self(hit: KnownEmail, message: MailMessage) -> bool:
    """A message never correlates to its own CRM email (same deterministic id)."""
    if not message.internet_message_id:
        return False
    try:
        return hit.activity_id == activity_id_for(message.internet_message_id)
    except ValueError:
        return False
