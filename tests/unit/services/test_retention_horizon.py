"""When a processed-ledger row may go: only once delta can no longer report its message again (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.services.delta import DeltaCursor
from core.services.retention import REDELIVERY_MARGIN, ledger_horizon
from core.settings.rows import RouterSettings

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def cursor(folder: str, *, high: timedelta | None, floor: timedelta) -> DeltaCursor:
    return DeltaCursor("a@x", folder, "link", high_water=NOW - high if high is not None else None,
                       round_started=NOW - floor)


def test_created_only_delta_reports_again_from_the_high_water_mark_of_a_restarted_round() -> None:
    inbox = cursor("inbox", high=timedelta(minutes=3), floor=timedelta(days=90))
    quiet = cursor("sentitems", high=timedelta(days=45), floor=timedelta(days=90))
    new = cursor("F1", high=None, floor=timedelta(days=2))  # no mail seen yet: a restart reads from the floor
    assert ledger_horizon([inbox], change_type_all=False, now=NOW) == \
        NOW - timedelta(minutes=3) - timedelta(minutes=10) - REDELIVERY_MARGIN
    # the folder that has been quiet longest decides for the whole mailbox (the ledger is per mailbox)
    assert ledger_horizon([inbox, quiet, new], change_type_all=False, now=NOW) == \
        NOW - timedelta(days=45) - timedelta(minutes=10) - REDELIVERY_MARGIN
    assert ledger_horizon([inbox, new], change_type_all=False, now=NOW) == NOW - timedelta(days=2) - REDELIVERY_MARGIN


def test_with_every_change_type_anything_since_the_rounds_floor_can_come_back() -> None:
    inbox = cursor("inbox", high=timedelta(minutes=3), floor=timedelta(days=90))
    assert ledger_horizon([inbox], change_type_all=True, now=NOW) == NOW - timedelta(days=90) - REDELIVERY_MARGIN


def test_a_mailbox_delta_does_not_read_needs_only_the_margin() -> None:
    assert ledger_horizon([], change_type_all=False, now=NOW) == NOW - REDELIVERY_MARGIN


def test_the_retention_defaults() -> None:
    router = RouterSettings()
    assert (router.retention_days, router.processed_folder, router.undeliverable_folder,
            router.processed_wrapper_days) == (30, "Processed", "Undeliverable", 30)
