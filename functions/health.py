"""GET /api/health: version and which dependencies are configured. Anonymous; never returns values."""

from __future__ import annotations

import json

import azure.functions as func

bp = func.Blueprint()


@bp.function_name("health")
@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    from core.config import VERSION, get_settings

    body = {"status": "ok", "version": VERSION, "configured": get_settings().configured()}
    return func.HttpResponse(json.dumps(body), status_code=200, mimetype="application/json")
