"""Inbound triggers (thin): the processor queue, the mailbox-sync queue, the reconcile and delta timers.

Every function builds nothing at import time: services come from the process container on first use.

Poison queues: there is deliberately no trigger on ``inbound-mail-poison`` / ``mailbox-sync-poison``. A trigger
would consume (delete) the poison messages the admin CLI replays from, and the host cannot peek. Instead, the
attempt that the host will poison (``dequeue_count == maxDequeueCount``) writes the reason to the PoisonLog table
and logs an error before it fails; the message itself stays in the poison queue for inspection and replay.
"""

from __future__ import annotations

import logging

import azure.functions as func

from core.names import INBOUND_QUEUE, MAILBOX_SYNC_QUEUE

bp = func.Blueprint()

log = logging.getLogger("emailrouter.functions.inbound")


@bp.function_name("inbound_processor")
@bp.queue_trigger(arg_name="msg", queue_name=INBOUND_QUEUE, connection="AzureWebJobsStorage")
async def inbound_processor(msg: func.QueueMessage) -> None:
    from core.bootstrap import get_container
    from core.services.inbound import processor_for

    result = await processor_for(get_container()).handle_message(
        msg.get_body().decode("utf-8", "replace"), dequeue_count=int(msg.dequeue_count or 1))
    log.info("inbound item %s: %s", msg.id, result.outcome)


@bp.function_name("mailbox_sync")
@bp.queue_trigger(arg_name="msg", queue_name=MAILBOX_SYNC_QUEUE, connection="AzureWebJobsStorage")
async def mailbox_sync(msg: func.QueueMessage) -> None:
    from core.bootstrap import get_container
    from core.services.delta import delta_service_for
    from core.services.inbound import MAX_DEQUEUE_COUNT, describe_error
    from core.work_items import MailboxSyncItem

    raw = msg.get_body().decode("utf-8", "replace")
    container = get_container()
    try:
        item = MailboxSyncItem.from_json(raw)
        reports = await delta_service_for(container).handle_sync_item(item)
    except Exception as exc:
        count = int(msg.dequeue_count or 1)
        if count >= MAX_DEQUEUE_COUNT:
            from core.adapters.inbound_state import InboundState

            await InboundState.for_container(container).poison.record(
                queue=MAILBOX_SYNC_QUEUE, message=raw, dequeue_count=count, reason=describe_error(exc))
            log.error("mailbox sync item fails on its last attempt; moving to poison: %s", describe_error(exc))
        raise
    log.info("mailbox sync (%s): %d folder(s), %d message(s) enqueued, %d processed here", item.reason,
             len(reports), sum(r.enqueued for r in reports), sum(r.processed for r in reports))


@bp.function_name("subscription_reconcile")
@bp.timer_trigger(arg_name="timer", schedule="%SUBSCRIPTION_RECONCILE_SCHEDULE%", run_on_startup=False,
                  use_monitor=True)
async def subscription_reconcile(timer: func.TimerRequest) -> None:
    from core.bootstrap import get_container
    from core.services.jobs import JobBusy
    from core.services.subscriptions import service_for

    try:
        report = await service_for(get_container(), role="timer").reconcile()
    except JobBusy as busy:  # an admin's reconcile (or another instance's) is running: it does this run's work
        log.info("subscription reconcile skipped: %s", busy)
        return
    log.info("subscription reconcile: %s", {k: v for k, v in report.as_dict().items() if k != "failed"}
             | {"failed": len(report.failed)})


@bp.function_name("delta_catchup")
@bp.timer_trigger(arg_name="timer", schedule="%DELTA_CATCHUP_SCHEDULE%", run_on_startup=False, use_monitor=True)
async def delta_catchup(timer: func.TimerRequest) -> None:
    from core.bootstrap import get_container
    from core.services.delta import delta_service_for
    from core.services.jobs import JobBusy

    container = get_container()
    try:
        count = await delta_service_for(container, role="timer").fan_out()
        log.info("delta catch-up: %d mailbox sync item(s) enqueued", count)
    except JobBusy as busy:
        log.info("delta catch-up skipped: %s", busy)
    # The router's own records expire here too (at most every RetentionIntervalMinutes; a timer of its own would
    # be one more Flex scale group, and the instance budget of docs/deploy.md "Scaling" has none to spare).
    from core.services.retention import run_retention_if_due

    try:
        report = await run_retention_if_due(container)
    except JobBusy as busy:  # an admin's `emailrouter retention run` is running
        log.info("retention clean-up skipped: %s", busy)
        return
    if report is not None:
        log.info("retention clean-up: %d deleted%s", report.deleted, " (more next run)" if report.more else "")

