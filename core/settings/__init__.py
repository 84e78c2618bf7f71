"""Mailbox and org settings: CRM values copied into Azure Tables, admin overrides, health (issue 7).

``rows`` is the pure core (parse/validate/merge rows); ``store`` the cached ``MailboxDirectory`` over the tables;
``crm_sync`` copies delivery methods and org settings from Dataverse; ``health`` probes mailboxes and writes the
results to the status table and back to the CRM mailbox record.
"""

from .rows import RouterSettings, RowError, parse_mailbox_row, parse_org_rows, row_key
from .store import SettingsUnavailableError, TableMailboxDirectory

__all__ = [
    "RouterSettings",
    "RowError",
    "SettingsUnavailableError",
    "TableMailboxDirectory",
    "parse_mailbox_row",
    "parse_org_rows",
    "row_key",
]
