"""GET /api/health: version and which dependencies are configured. Anonymous; never returns values.

A setting that is still an unresolved Key Vault reference makes its dependency "not configured" and is named
under ``unresolved`` (the names only); ``status`` is then ``degraded``.
"""

from __future__ import annotations

import json

import azure.functions as func

bp = func.Blueprint()


@bp.function_name("health")
@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    from core.config import UNRESOLVED_REASON, VERSION, get_settings

    settings = get_settings()
    unresolved = settings.unresolved()
    body: dict[str, object] = {"status": "degraded" if unresolved else "ok", "version": VERSION,
                               "configured": settings.configured(), "unresolved": unresolved}
    if unresolved:
        body["reason"] = UNRESOLVED_REASON
    return func.HttpResponse(json.dumps(body), status_code=200, mimetype="application/json")
