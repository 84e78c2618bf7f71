"""Timers of the settings issue: CRM -> settings sync and the mailbox health probe (blueprint ``bp``).

Thin: build the container inside the body, call the service, log a one-line summary. The health timer fires every
5 minutes; the service only probes mailboxes that are due (healthy: every HealthProbeIntervalMinutes, failing: with
exponential back-off), so the schedule is a resolution, not a probe rate.
"""

from __future__ import annotations

import logging

import azure.functions as func

bp = func.Blueprint()
_log = logging.getLogger("emailrouter.settings")


@bp.function_name("crm_settings_sync")
@bp.timer_trigger(schedule="%CRM_SYNC_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=True)
async def crm_settings_sync(timer: func.TimerRequest) -> None:
    from core.bootstrap import get_container
    from core.services.jobs import JobBusy
    from core.settings.crm_sync import run_scheduled_sync

    try:
        report = await run_scheduled_sync(get_container())
    except JobBusy as busy:  # an admin's `emailrouter sync-crm` is running
        _log.info("CRM sync skipped: %s", busy)
        return
    if report is not None and report.errors:
        _log.warning("CRM sync finished with %d row error(s)", len(report.errors))


@bp.function_name("mailbox_health_probe")
@bp.timer_trigger(schedule="%MAILBOX_HEALTH_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=True)
async def mailbox_health_probe(timer: func.TimerRequest) -> None:
    from core.bootstrap import get_container
    from core.services.jobs import JobBusy
    from core.settings.health import Health, health_service_for

    try:
        outcomes = await health_service_for(get_container(), role="timer").probe_due()
    except JobBusy as busy:  # `emailrouter mailbox test --all` (or another instance) is probing
        _log.info("mailbox health probe skipped: %s", busy)
        return
    failing = sum(1 for o in outcomes if o.health is Health.FAILING)
    _log.info("mailbox health: %d probed, %d failing", len(outcomes), failing)
