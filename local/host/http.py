"""The HTTP front: function routes under the route prefix and a few of the host's admin APIs.

Matching follows the real host where a function can observe it: a path that matches no route, or a
route whose methods exclude the request's method, gives 404 (the host registers routes with method
constraints, so an unbound method is "not found", not 405); a missing or wrong key gives 401; an
exception in the function gives 500 with an empty body; no response at all gives 204.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import azure.functions as func
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .discovery import FunctionSpec, HttpTriggerSpec, TriggerKind
from .keys import AUTH_ADMIN, AUTH_ANONYMOUS

if TYPE_CHECKING:
    from .host import FunctionsHost

__all__ = ["build_app", "to_starlette_response"]

log = logging.getLogger("Host.Http")

HTTP_REASON = "This function was programmatically called via the host APIs."


def _presented_key(request: Request) -> str | None:
    return request.query_params.get("code") or request.headers.get("x-functions-key")


def _join_headers(request: Request) -> dict[str, str]:
    # Repeated headers are folded with ", " as ASP.NET presents them to the worker.
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def to_starlette_response(value: Any) -> Response:
    """func.HttpResponse (or str) -> an HTTP response, following HttpResponseConverter.encode."""
    if value is None:
        return Response(status_code=204)
    if isinstance(value, str):
        return Response(value.encode("utf-8"), status_code=200, media_type="text/plain; charset=utf-8")
    if isinstance(value, func.HttpResponse):
        headers = [(k.lower(), v) for k, v in value.headers.items()]
        if not any(k == "content-type" for k, _ in headers):
            ct = f"{value.mimetype}; charset={value.charset}" if value.mimetype.startswith("text/") else value.mimetype
            headers.append(("content-type", ct))
        resp = Response(value.get_body() or b"", status_code=value.status_code)
        # raw_headers keeps repeated headers (Set-Cookie) and our content-type verbatim.
        resp.raw_headers = [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers if k != "content-length"
        ] + [(b"content-length", str(len(resp.body)).encode())]
        return resp
    log.error("HTTP output of type %s is not supported; answering 500", type(value).__name__)
    return Response(status_code=500)


def build_app(host: FunctionsHost) -> Starlette:
    http_functions = sorted(
        (f for f in host.functions if f.kind == TriggerKind.HTTP),
        key=lambda f: _http(f).route.precedence,
    )
    prefix = host.config.route_prefix

    def require(level: str, request: Request, function_name: str | None = None) -> Response | None:
        if host.keys.authorize(level, function_name, _presented_key(request)):
            return None
        return Response(status_code=401)

    async def ping(request: Request) -> Response:
        # 200 only once every trigger is listening: the stack launcher's health check.
        return Response(status_code=200 if host.started else 503)

    async def status(request: Request) -> Response:
        if (denied := require(AUTH_ADMIN, request)) is not None:
            return denied
        return JSONResponse(host.status())

    async def list_functions(request: Request) -> Response:
        if (denied := require(AUTH_ADMIN, request)) is not None:
            return denied
        return JSONResponse([host.describe(f) for f in host.functions])

    async def invoke_function(request: Request) -> Response:
        """POST /admin/functions/{name} {"input": "..."}: run a non-HTTP function now (202)."""
        if (denied := require(AUTH_ADMIN, request)) is not None:
            return denied
        name = request.path_params["name"]
        spec = next((f for f in host.functions if f.name.lower() == name.lower()), None)
        if spec is None:
            return Response(status_code=404)
        if spec.kind == TriggerKind.HTTP:
            return JSONResponse({"error": "HTTP functions are invoked through their route"}, status_code=400)
        raw = await request.body()
        try:
            payload = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            return JSONResponse({"error": "body must be JSON like {\"input\": \"...\"}"}, status_code=400)
        text = payload.get("input", "") if isinstance(payload, dict) else ""
        if not host.accepting:
            return Response(status_code=503)
        host.run_now(spec, "" if text is None else str(text))
        return Response(status_code=202)

    async def dispatch(request: Request) -> Response:
        path = request.url.path
        if prefix:
            if not (path.lower() == f"/{prefix.lower()}" or path.lower().startswith(f"/{prefix.lower()}/")):
                return Response(status_code=404)
            rest = path[len(prefix) + 1 :]
        else:
            rest = path
        for spec in http_functions:
            trig = _http(spec)
            values = trig.route.match(rest)
            if values is None:
                continue
            if trig.methods is not None and request.method.upper() not in trig.methods:
                continue
            return await _call(spec, trig, request, values)
        return Response(status_code=404)

    async def _call(spec: FunctionSpec, trig: HttpTriggerSpec, request: Request, values: dict[str, str]) -> Response:
        if trig.auth_level != AUTH_ANONYMOUS and (denied := require(trig.auth_level, request, spec.name)):
            return denied
        if not host.accepting:
            return Response(status_code=503)
        body = await request.body()
        req = func.HttpRequest(
            method=request.method,
            url=str(request.url),
            headers=_join_headers(request),
            params=dict(request.query_params),
            route_params=values,
            body=body,
        )
        result = await host.invoker.invoke(spec, req, reason=HTTP_REASON)
        if not result.succeeded:
            return Response(status_code=500)
        out_name = next((o.name for o in spec.outputs if o.type == "http"), "$return")
        return to_starlette_response((result.outputs or {}).get(out_name))

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    routes = [
        Route("/admin/host/ping", ping, methods=["GET", "POST"]),
        Route("/admin/host/status", status, methods=["GET"]),
        Route("/admin/functions", list_functions, methods=["GET"]),
        Route("/admin/functions/{name}", invoke_function, methods=["POST"]),
        Route("/{path:path}", dispatch, methods=methods),
    ]
    return Starlette(routes=routes)


def _http(spec: FunctionSpec) -> HttpTriggerSpec:
    assert isinstance(spec.trigger, HttpTriggerSpec)
    return spec.trigger
