"""HTTP triggers for Microsoft Graph change and lifecycle notifications (function key required).

Thin: validation handshake echo, then hand the raw body to the webhook service, which checks each
item (our subscription, clientState in constant time, tenant) and enqueues work items. Answers 202
in milliseconds; never calls Graph or Dataverse.
"""

from __future__ import annotations

import json

import azure.functions as func

bp = func.Blueprint()


def _handshake(req: func.HttpRequest) -> func.HttpResponse | None:
    token = req.params.get("validationToken")
    if token is None:
        return None
    from core.services.webhook import validation_response

    echo = validation_response(token)
    if echo is None:
        return func.HttpResponse("invalid validation token", status_code=400, mimetype="text/plain")
    # text/plain + nosniff: the token is opaque and must never be interpreted as markup.
    return func.HttpResponse(echo, status_code=200, mimetype="text/plain",
                             headers={"X-Content-Type-Options": "nosniff"})


def _result_response(status: int, accepted: int, rejected: int, error: str) -> func.HttpResponse:
    if status == 202:
        return func.HttpResponse(status_code=202)
    body = json.dumps({"error": error or "rejected", "accepted": accepted, "rejected": rejected})
    return func.HttpResponse(body, status_code=status, mimetype="application/json")


async def _notifications(req: func.HttpRequest, lifecycle: bool) -> func.HttpResponse:
    handshake = _handshake(req)
    if handshake is not None:
        return handshake
    from core.bootstrap import get_container
    from core.services.webhook import handle_change_notifications, handle_lifecycle_notifications

    c = get_container()
    body, settings = req.get_body(), c.settings
    if lifecycle:
        result = await handle_lifecycle_notifications(
            body, directory=c.subscription_directory, queue=c.work_queue, tenant_id=settings.graph_tenant_id,
            max_bytes=settings.webhook_max_body_bytes)
    else:
        result = await handle_change_notifications(
            body, directory=c.subscription_directory, queue=c.work_queue, tenant_id=settings.graph_tenant_id,
            max_bytes=settings.webhook_max_body_bytes, hot=c.hot_mailboxes)
    return _result_response(result.status, result.accepted, len(result.rejected), result.error)


@bp.function_name("graph_notifications")
@bp.route(route="graph/notifications", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def graph_notifications(req: func.HttpRequest) -> func.HttpResponse:
    return await _notifications(req, lifecycle=False)


@bp.function_name("graph_lifecycle")
@bp.route(route="graph/lifecycle", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def graph_lifecycle(req: func.HttpRequest) -> func.HttpResponse:
    return await _notifications(req, lifecycle=True)
