"""Outbound triggers (issue 6): the scan timer (scan + reaper) and the sender queue trigger. Thin: build the
service from the container on first use, call it, log the result.

Poison: a work item that keeps raising lands in ``outbound-mail-poison`` (host.json ``maxDequeueCount``). Nothing
is lost by that: the email is still Pending Send (the scan enqueues it again after
OUTBOUND_REQUEUE_AFTER_SECONDS) or Sending (the reaper returns it after OutboundReaperTimeoutSeconds).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import azure.functions as func

from core.names import OUTBOUND_QUEUE

if TYPE_CHECKING:
    from core.services.outbound import OutboundService

bp = func.Blueprint()
log = logging.getLogger("emailrouter.outbound")

_lock = threading.Lock()
_services: dict[int, OutboundService] = {}


def outbound_service() -> OutboundService:
    """The process's OutboundService over the container's adapters (one per container: the mailbox directory
    caches settings, the clients pool connections)."""
    from core.bootstrap import get_container

    container = get_container()
    service = _services.get(id(container))
    if service is not None:
        return service
    with _lock:
        service = _services.get(id(container))
        if service is None:
            from core.adapters.outbound_state import TableMailboxOutboundStatus, TableOutboundLedger
            from core.services.org_schema import org_schema_for
            from core.services.outbound import OutboundService, OutboundSettings
            from core.services.outbound_crm import DataverseOutboundCrm

            settings = OutboundSettings.from_settings(container.settings)
            service = OutboundService(
                crm=DataverseOutboundCrm(container.dataverse),
                ledger=TableOutboundLedger(container.storage),
                directory=container.mailbox_directory,
                mail=container.graph,
                queue=container.work_queue,
                status=TableMailboxOutboundStatus(container.storage),
                settings=settings,
                schema=org_schema_for(container),
            )
            _services.clear()
            _services[id(container)] = service
    return service


@bp.function_name("outbound_scan")
@bp.timer_trigger(arg_name="timer", schedule="%OUTBOUND_SCAN_SCHEDULE%", run_on_startup=False, use_monitor=False)
async def outbound_scan(timer: func.TimerRequest) -> None:
    service = outbound_service()
    scanned = await service.scan()
    reaped = await service.reap()
    if reaped.returned or reaped.finished or reaped.failed:
        log.info("outbound reaper: %d returned to Pending Send, %d finished as Sent, %d failed",
                 reaped.returned, reaped.finished, reaped.failed)
    del scanned  # the service logs the scan itself (and why it did not run, when it did not)


@bp.function_name("outbound_send")
@bp.queue_trigger(arg_name="msg", queue_name=OUTBOUND_QUEUE, connection="AzureWebJobsStorage")
async def outbound_send(msg: func.QueueMessage) -> None:
    result = await outbound_service().handle(msg.get_body())
    log.info("outbound item %s: %s %s", msg.id, result.outcome.value, result.reason)
