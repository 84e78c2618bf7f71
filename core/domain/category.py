"""Track by category (SSS's ``TrackCategorizedItems``): pure rules.

A user asks for a message to be tracked by giving it the org's tracking category in Outlook (OrgSettings
``TrackCategoryName``, "Tracked to Dynamics 365" by default, as SSS names it). The router finds such messages with a
periodic Graph query per mailbox (core/services/category_tracking.py) and sends each through the normal inbound
pipeline as ``InboundItem(source="category")``. What is decided here:

* which mailboxes take part: the router's own inbound method ("Server-Side Synchronization or Email Router",
  ``individual``) on a user or queue mailbox enabled for incoming email - forward users' mail is tracked through
  their sink, where they do not see it, and a sink belongs to nobody;
* the query: ``lastModifiedDateTime ge <watermark> and categories/any(c:c eq '<name>')`` on ``/users/{id}/messages``
  (every folder: the point of the feature is mail outside the Inbox);
* which found messages are work: not those the router already tracked (its own "tracked" category modifies them,
  so they show up; the ledger says TRACKED) and not those a category request was already answered for - once.
  Mail that automatic processing skipped or failed is evaluated again, as the user asked.

SSS tracks manually tracked mail (App for Outlook, folder, category) "regardless of the filtering options
configured, as the user intended to manually track the email" (power-platform admin, "Email message filtering and
correlation"); the planner accordingly skips the tracking filter and the folder rules for such a request
(core/domain/inbound.py, core/domain/skip.py, core/domain/filtering.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Final

from core.domain.model import InboundMethod, MailboxConfig, MailboxKind

__all__ = [
    "CATEGORY_SOURCE",
    "FIRST_LOOKBACK",
    "WATERMARK_SLACK",
    "category_filter",
    "category_trackable",
    "has_category",
    "search_since",
]

CATEGORY_SOURCE: Final = "category"  # InboundItem.source and the ledger's Source of a category request
# Exchange's clock is not ours and a change can become visible to the query a little after lastModifiedDateTime:
# every search reaches back this far before the last search's start (the ledger drops what was seen already).
WATERMARK_SLACK: Final = timedelta(minutes=5)
# The first search of a mailbox (the setting was just switched on): recent categorisations only, no history.
FIRST_LOOKBACK: Final = timedelta(minutes=15)


def has_category(categories: Iterable[str], name: str) -> bool:
    """Outlook category names compare case-insensitively (as Exchange's ``eq`` on strings does)."""
    wanted = name.strip().casefold()
    return bool(wanted) and any(str(c).strip().casefold() == wanted for c in categories)


def category_trackable(mailbox: MailboxConfig) -> bool:
    """A mailbox whose users may track mail by category: read by the router directly (inbound ``individual``), a
    user's or a queue's, enabled for incoming email."""
    return (mailbox.kind in (MailboxKind.USER, MailboxKind.QUEUE)
            and mailbox.inbound_method is InboundMethod.INDIVIDUAL and mailbox.enabled_for_incoming)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def category_filter(name: str, since: datetime) -> str:
    """The ``$filter`` of the search: the documented lambda over a collection of strings
    (``collection/any(c:c eq 'value')``, Graph "Use the $filter query parameter") on ``message.categories``
    (Collection(Edm.String)), after a date condition on ``lastModifiedDateTime``. Single quotes are doubled (OData
    string literal)."""
    literal = name.replace("'", "''")
    return f"lastModifiedDateTime ge {_stamp(since)} and categories/any(c:c eq '{literal}')"


def search_since(watermark: datetime | None, now: datetime) -> datetime:
    """Where a mailbox's search starts: the last successful search's start minus the slack, or a short look back
    on the first search."""
    if watermark is None:
        return now - FIRST_LOOKBACK
    return min(watermark, now) - WATERMARK_SLACK
