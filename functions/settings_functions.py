"""Timers of the settings issue: CRM -> settings sync and the mailbox health probe (blueprint ``bp``).

Thin: build the container inside the body, call the service, log a one-line summary. The health timer fires every
30 seconds: first it answers CRM's Test & Enable requests on router mailboxes (one Dataverse query; a pressed button
is answered within a minute), then it probes the mailboxes that are due (healthy: every HealthProbeIntervalMinutes,
failing: with exponential back-off), so the schedule is a resolution, not a probe rate. No timer of its own: every
timer is a Flex Consumption scale group (docs/deploy.md "Scaling").
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
# use_monitor off as for every sub-minute schedule (the outbound scan too): the next tick is 30 s away anyway.
@bp.timer_trigger(schedule="%MAILBOX_HEALTH_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=False)
async def mailbox_health_probe(timer: func.TimerRequest) -> None:
    from core.bootstrap import get_container
    from core.services.jobs import JobBusy
    from core.settings.health import Health, health_service_for
    from core.settings.test_requests import crm_test_service_for

    container = get_container()
    health = health_service_for(container, role="timer")
    try:
        report = await crm_test_service_for(container, health=health).run()
    except Exception as exc:  # CRM unreachable: the health probes below still run; the requests stay set
        _log.warning("CRM Test & Enable requests not read (%s)", type(exc).__name__)
    else:
        if report.answered or report.failed:
            _log.info("CRM Test & Enable: %d answered, %d not written, %d waiting", len(report.answered),
                      len(report.failed), len(report.waiting))
    try:
        outcomes = await health.probe_due()
    except JobBusy as busy:  # `emailrouter mailbox test --all` (or another instance) is probing
        _log.info("mailbox health probe skipped: %s", busy)
        return
    if outcomes:
        failing = sum(1 for o in outcomes if o.health is Health.FAILING)
        _log.info("mailbox health: %d probed, %d failing", len(outcomes), failing)
