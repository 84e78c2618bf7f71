"""Deterministic ids, so every write is idempotent (issue 5 "Write (exactly once)", dv-ref §6).

* ``activity_id_for(message_id)``: the CRM email's ``activityid`` is a UUIDv5 of the normalised Internet
  Message-ID. The same message reaching two tracked mailboxes (two users on To, or a user's Inbox and a colleague's
  Sent Items) therefore becomes ONE CRM email, and a redelivered notification re-creates the same id, which
  Dataverse rejects as a duplicate key (dv-ref §6 ``0x80040237``) = "already tracked".

  This deliberately differs from the dv-ref §6 sketch (``mailbox_id + Message-ID``), which would make one email per
  mailbox; the issue asks for one email per message, and SSS itself dedups on Message-ID (``messageiddupcheck``,
  crm-ref §11).

* ``outbound_message_id(activity_id, nonce, domain)``: the Message-ID the router gives an email it sends for CRM,
  chosen before the Graph draft exists (Graph: a message's ``internetMessageId`` is "Updatable only if isDraft =
  true", message-update). It carries the CRM activity id, so a reply's In-Reply-To/References lead straight back to
  the CRM email (:func:`outbound_activity_id`) although a Sent email keeps no ``messageid`` in CRM; and a worker
  that crashed between creating the draft and recording it can find that draft again by the id.

* Normalisation of a Message-ID: surrounding whitespace and the angle brackets are removed (RFC 5322 §3.6.4: "the
  angle bracket characters are not part of the msg-id"); folding whitespace inside is removed. Case is KEPT: RFC
  5322 defines no case-insensitive comparison for msg-id and the generator (left part) may well be case-sensitive
  (Exchange ids mix cases); lower-casing could merge two different messages, while keeping case can at worst miss a
  merge if some relay re-cased an id, which we have never seen. Same reasoning for the right part (kept as is).
"""

from __future__ import annotations

import re
import uuid
from typing import Final

__all__ = [
    "ACTIVITY_NAMESPACE",
    "ATTACHMENT_NAMESPACE",
    "CONTACT_NAMESPACE",
    "activity_id_for",
    "attachment_id_for",
    "canonical_message_id",
    "contact_id_for",
    "normalize_message_id",
    "outbound_activity_id",
    "outbound_message_id",
]

# Fixed namespaces (never change them: every id already written to CRM depends on them). Derived once from
# uuid5(NAMESPACE_URL, "urn:email-router-d365:<purpose>") and frozen as literals.
ACTIVITY_NAMESPACE: Final = uuid.UUID("6eac563e-f208-5bc1-803e-c005b11a0bb4")
ATTACHMENT_NAMESPACE: Final = uuid.UUID("163786eb-1d3c-5e33-b3d8-2f37dfc19c08")
CONTACT_NAMESPACE: Final = uuid.UUID("16db876f-ff16-5916-a3b9-1bd7819a41d1")

_WHITESPACE: Final = re.compile(r"\s+")
_OUTBOUND_ID: Final = re.compile(r"^er\.([0-9a-f]{32})\.[0-9a-z]{1,16}@[^@\s]+$")
_NONCE: Final = re.compile(r"^[0-9a-z]{1,16}$")


def normalize_message_id(message_id: str) -> str:
    """``" <AbC@host> "`` -> ``"AbC@host"``. Raises ValueError for an empty id (nothing to key on)."""
    core = _WHITESPACE.sub("", message_id)
    if core.startswith("<"):
        core = core[1:]
    if core.endswith(">"):
        core = core[:-1]
    if not core:
        raise ValueError("empty Message-ID")
    return core


def canonical_message_id(message_id: str) -> str:
    """The form stored in ``email.messageid`` and used as correlation key: ``<core>`` (Graph's own form)."""
    return f"<{normalize_message_id(message_id)}>"


def activity_id_for(internet_message_id: str) -> uuid.UUID:
    return uuid.uuid5(ACTIVITY_NAMESPACE, normalize_message_id(internet_message_id))


def attachment_id_for(activity_id: uuid.UUID, index: int, filename: str) -> uuid.UUID:
    """Deterministic ``activitymimeattachmentid`` so a retried attachment upload is a duplicate, not a copy."""
    return uuid.uuid5(ATTACHMENT_NAMESPACE, f"{activity_id}\n{index}\n{filename}")


def contact_id_for(address: str) -> uuid.UUID:
    """Deterministic id for an auto-created contact: two mailboxes racing to create the same unknown sender
    produce one contact (the second create is a duplicate key)."""
    return uuid.uuid5(CONTACT_NAMESPACE, address.strip().lower())


def outbound_message_id(activity_id: uuid.UUID, nonce: str, domain: str) -> str:
    """``<er.<activityid hex>.<nonce>@<domain>>``: globally unique (activity id + a nonce per send generation),
    RFC 5322 dot-atom on both sides, and recognisable by :func:`outbound_activity_id`."""
    if not _NONCE.match(nonce):
        raise ValueError(f"nonce {nonce!r} must be 1-16 lower-case letters or digits")
    host = domain.strip().strip("<>@").lower()
    if not host or any(c.isspace() or c in "<>@" for c in host):
        raise ValueError(f"{domain!r} is not a domain")
    return f"<er.{activity_id.hex}.{nonce}@{host}>"


def outbound_activity_id(message_id: str) -> uuid.UUID | None:
    """The CRM activity id inside a Message-ID the router chose (:func:`outbound_message_id`), else None."""
    try:
        core = normalize_message_id(message_id)
    except ValueError:
        return None
    found = _OUTBOUND_ID.match(core.lower())
    return uuid.UUID(hex=found.group(1)) if found else None
