"""Track by category, pure: which mailboxes take part, the query, the search window, and the planner's manual path
(SSS: manually tracked mail is tracked "regardless of the filtering options configured", in any folder)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from core.domain.category import (
    FIRST_LOOKBACK,
    WATERMARK_SLACK,
    category_filter,
    category_trackable,
    has_category,
    search_since,
)
from core.domain.inbound import InboundContext, Skip, TrackEmail, plan_inbound
from core.domain.model import Folder, FolderKind, InboundMethod, MailboxKind, TrackingFilter

from .factories import ALICE, NOW, addr, directory, message, org, queue_mailbox, user_mailbox

TAG = "Tracked to Dynamics 365"


def context(**overrides: Any) -> InboundContext:
    values: dict[str, Any] = {"mailbox": user_mailbox(tracking_filter=TrackingFilter.NONE), "org": org(), "now": NOW,
                              "directory": directory(), "requested_category": TAG}
    values.update(overrides)
    return InboundContext(**values)


def stranger_mail(**overrides: Any) -> Any:
    values: dict[str, Any] = {"from_": addr("nobody@unknown.example"), "categories": ("tracked to dynamics 365",),
                              "folder": Folder(FolderKind.OTHER, "projects-folder-id")}
    values.update(overrides)
    return message(**values)


# ------------------------------------------------------------------------------------------------ rules


def test_category_names_compare_case_insensitively() -> None:
    assert has_category(["Red", " tracked TO dynamics 365"], TAG)
    assert not has_category(["Tracked to Dynamics"], TAG) and not has_category([TAG], "")


@pytest.mark.parametrize(("mailbox", "expected"), [
    (user_mailbox(), True),
    (queue_mailbox(), True),
    (user_mailbox(inbound_method=InboundMethod.FORWARD), False),  # their mail is tracked in the sink
    (user_mailbox(inbound_method=InboundMethod.OUTLOOK), False),
    (user_mailbox(enabled_for_incoming=False), False),
    (user_mailbox(kind=MailboxKind.FORWARD_SINK, owner=None), False),
])
def test_which_mailboxes_take_part(mailbox: Any, expected: bool) -> None:
    assert category_trackable(mailbox) is expected


def test_the_query_is_the_documented_lambda_after_a_date_condition() -> None:
    assert category_filter("Bob's CRM", NOW) == (
        "lastModifiedDateTime ge 2026-03-02T12:00:00Z and categories/any(c:c eq 'Bob''s CRM')")


def test_the_window_reaches_back_past_the_last_search_and_starts_short() -> None:
    assert search_since(None, NOW) == NOW - FIRST_LOOKBACK
    assert search_since(NOW - timedelta(minutes=5), NOW) == NOW - timedelta(minutes=5) - WATERMARK_SLACK
    # A watermark in our future (clock change) never makes the window start after now.
    assert search_since(NOW + timedelta(hours=1), NOW) == NOW - WATERMARK_SLACK


# ------------------------------------------------------------------------------------------------ the planner


def test_a_requested_message_is_tracked_in_any_folder_whatever_the_filter() -> None:
    plan = plan_inbound(stranger_mail(), context())
    assert isinstance(plan, TrackEmail), plan
    assert plan.owner == ALICE and plan.accepting_entity == ALICE
    steps = {d.step: d for d in plan.decisions}
    assert steps["request"].outcome == "category" and TAG in steps["request"].why
    assert any(d.outcome == "tracked:category" for d in plan.decisions)


def test_without_the_request_the_same_message_is_not_tracked() -> None:
    plan = plan_inbound(stranger_mail(), context(requested_category=""))
    assert isinstance(plan, Skip) and plan.code == "folder_not_tracked"
    inbox = plan_inbound(stranger_mail(folder=Folder(FolderKind.INBOX, "inbox-id")), context(requested_category=""))
    assert isinstance(inbox, Skip) and inbox.stage == "filter"  # filter 4: no email messages


def test_a_category_removed_before_processing_withdraws_the_request() -> None:
    plan = plan_inbound(stranger_mail(categories=("Red",)), context())
    assert isinstance(plan, Skip) and plan.code == "folder_not_tracked"


@pytest.mark.parametrize(("folder", "direction"), [(FolderKind.SENT_ITEMS, True), (FolderKind.JUNK, False)])
def test_sent_items_and_junk_are_trackable_on_request(folder: FolderKind, direction: bool) -> None:
    mail = stranger_mail(folder=Folder(folder, ""))
    plan = plan_inbound(mail, context())
    assert isinstance(plan, TrackEmail) and plan.direction.directioncode is direction


@pytest.mark.parametrize(("overrides", "code"), [
    ({"is_draft": True}, "draft"),  # not mail yet
    ({"headers": (("Auto-Submitted", "auto-replied"),)}, "auto_reply"),
    ({"internet_message_id": None}, "no_message_id"),  # cannot be tracked exactly once
])
def test_every_other_skip_rule_still_applies(overrides: dict[str, Any], code: str) -> None:
    plan = plan_inbound(stranger_mail(**overrides), context())
    assert isinstance(plan, Skip) and plan.code == code


def test_the_never_log_list_wins_over_a_request() -> None:
    plan = plan_inbound(stranger_mail(), context(org=org(never_log_domains=frozenset({"unknown.example"}))))
    assert isinstance(plan, Skip) and plan.code == "never_log"


def test_a_mailbox_that_takes_no_part_ignores_the_request() -> None:
    forward = user_mailbox(inbound_method=InboundMethod.FORWARD, forward_sink_address="sink@contoso.com")
    plan = plan_inbound(stranger_mail(folder=Folder(FolderKind.INBOX, "i")), context(mailbox=forward))
    assert isinstance(plan, Skip) and plan.code == "inbound_forward"


def test_a_queue_mailbox_tracks_a_request_for_the_queue() -> None:
    queue = queue_mailbox(tracking_filter=TrackingFilter.NONE)
    plan = plan_inbound(stranger_mail(mailbox=queue.address, to=(addr(queue.address),)), context(mailbox=queue))
    assert isinstance(plan, TrackEmail) and plan.accepting_entity == queue.owner
