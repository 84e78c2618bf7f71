"""GET /api/status: the read-only status page (function key required, like every non-public HTTP trigger).

Thin: collect the snapshot (``core.services.status``), render it (``core.status_page``). Storage only; when storage
cannot be read the page says so with 503 and no data.
"""

from __future__ import annotations

import logging

import azure.functions as func

bp = func.Blueprint()
_log = logging.getLogger("emailrouter.status")


@bp.function_name("status_page")
@bp.route(route="status", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
async def status_page(req: func.HttpRequest) -> func.HttpResponse:
    from core.bootstrap import get_container
    from core.config import VERSION
    from core.services.status import collect_status
    from core.status_page import HEADERS, render_status_page, render_unavailable_page

    try:
        report = await collect_status(get_container())
    except Exception as exc:
        _log.warning("status page: state not readable (%s)", type(exc).__name__)
        return func.HttpResponse(render_unavailable_page(f"the router's storage could not be read "
                                                         f"({type(exc).__name__})"),
                                 status_code=503, mimetype="text/html", charset="utf-8", headers=HEADERS)
    return func.HttpResponse(render_status_page(report, version=VERSION), status_code=200, mimetype="text/html",
                             charset="utf-8", headers=HEADERS)
