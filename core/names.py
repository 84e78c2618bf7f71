"""Names of the queues and tables the router uses (one place; infra/ creates each of them).

Queue names are fixed (the trigger bindings need literals); table names get the TABLE_PREFIX
setting in front (see ``table_name``).
"""

from __future__ import annotations

from typing import Final

INBOUND_QUEUE: Final = "inbound-mail"
OUTBOUND_QUEUE: Final = "outbound-mail"
MAILBOX_SYNC_QUEUE: Final = "mailbox-sync"

QUEUES: Final = (INBOUND_QUEUE, OUTBOUND_QUEUE, MAILBOX_SYNC_QUEUE)
POISON_SUFFIX: Final = "-poison"
ALL_QUEUES: Final = QUEUES + tuple(q + POISON_SUFFIX for q in QUEUES)

# Logical table names; the real name is TABLE_PREFIX + logical name.
MAILBOXES_TABLE: Final = "Mailboxes"
ORG_SETTINGS_TABLE: Final = "OrgSettings"
SUBSCRIPTIONS_TABLE: Final = "Subscriptions"
DELTA_STATE_TABLE: Final = "DeltaState"
PROCESSED_TABLE: Final = "Processed"
MAILBOX_STATUS_TABLE: Final = "MailboxStatus"
DECISIONS_TABLE: Final = "Decisions"
DECISION_INDEX_TABLE: Final = "DecisionIndex"
OUTBOUND_TABLE: Final = "Outbound"
POISON_LOG_TABLE: Final = "PoisonLog"
LEASES_TABLE: Final = "Leases"

TABLES: Final = (
    MAILBOXES_TABLE,
    ORG_SETTINGS_TABLE,
    SUBSCRIPTIONS_TABLE,
    DELTA_STATE_TABLE,
    PROCESSED_TABLE,
    MAILBOX_STATUS_TABLE,
    DECISIONS_TABLE,
    DECISION_INDEX_TABLE,
    OUTBOUND_TABLE,
    POISON_LOG_TABLE,
    LEASES_TABLE,
)


def table_name(prefix: str, logical: str) -> str:
    return f"{prefix}{logical}"
