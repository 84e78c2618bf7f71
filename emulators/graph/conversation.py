"""Exchange conversation threading: PidTagConversationIndex (Thread-Index) and conversationId.

Index layout (MS-OXOMSG 2.2.1.3): a 22-byte header — reserved 0x01, the high 5 bytes of the current
FILETIME, a 16-byte GUID — followed by one 5-byte child block per reply: 1 bit delta code, 31 bits of
time delta, 4 random bits, 4 sequence bits. The conversationId is derived from the header GUID only, so
every message of a thread, in every mailbox, shares it (as Exchange does).
"""

from __future__ import annotations

import base64
import os
import uuid
from datetime import UTC, datetime

__all__ = ["child_index", "conversation_id_for", "new_conversation_index"]

_EPOCH_1601 = datetime(1601, 1, 1, tzinfo=UTC)


def _filetime(when: datetime) -> int:
    delta = when.astimezone(UTC) - _EPOCH_1601
    return (delta.days * 86400 + delta.seconds) * 10_000_000 + delta.microseconds * 10


def new_conversation_index(when: datetime) -> bytes:
    high5 = (_filetime(when) >> 24) & 0xFF_FFFF_FFFF
    return b"\x01" + high5.to_bytes(5, "big") + uuid.uuid4().bytes


def child_index(parent: bytes, when: datetime) -> bytes:
    """The parent's index plus one child block (a reply in the same conversation)."""
    if len(parent) < 22:
        return new_conversation_index(when)
    header_time = int.from_bytes(parent[1:6], "big") << 24
    diff = max(0, _filetime(when) - header_time)
    if diff < (1 << 49):
        word = (diff >> 18) & 0x7FFF_FFFF
    else:
        word = (1 << 31) | ((diff >> 23) & 0x7FFF_FFFF)
    tail = ((os.urandom(1)[0] & 0x0F) << 4) | ((len(parent) - 22) // 5 & 0x0F)
    return parent + word.to_bytes(4, "big") + bytes([tail])


def conversation_id_for(index: bytes) -> str:
    guid = index[6:22] if len(index) >= 22 else uuid.uuid5(uuid.NAMESPACE_OID, index.hex()).bytes
    return base64.urlsafe_b64encode(b"\x00\x00\x10\x00\x04\x24" + guid).decode()


def index_from_b64(value: str | None) -> bytes | None:
    if not value:
        return None
    try:
        raw = base64.b64decode(value, validate=False)
    except ValueError:
        return None
    return raw if len(raw) >= 22 else None
