"""Starlette application: authentication, impersonation, service protection, faults, request log, emulator API.

Request pipeline for ``/api/data/v9.2/...``: bearer token (``emulators.common.tokens``; aud = org URL) -> calling
application user (systemuser with ``applicationid`` = token appid, else 403 0x80072560) -> impersonation headers ->
service protection (per effective user) -> injected faults -> ``Dataverse.dispatch`` / ``$batch``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from emulators.common.tokens import InvalidToken, TokenValidator

from .batch import handle_batch
from .errors import DataverseError
from .protection import FaultInjector, Limits, RequestLog, ServiceProtection
from .schema import ENTITIES
from .seed import SeedError, apply_seed, demo_seed
from .service import API_PATH, ApiRequest, ApiResponse, Caller, Dataverse, Options, OrgVariant
from .store import Store

__all__ = ["DataverseConfig", "EmulatorState", "create_app"]

log = logging.getLogger("emulators.dataverse")


@dataclass
class DataverseConfig:
    org_url: str  # https://127.0.0.1:<port> - the token audience
    identity_url: str | None  # None disables authentication (only for in-process unit tests)
    ca_bundle: str | None = None
    state_path: str = ":memory:"  # SQLite file, or :memory:
    seed: dict[str, Any] | None = None  # None = the demo seed
    options: Options = field(default_factory=Options)
    variant: OrgVariant = field(default_factory=OrgVariant)  # variant org switches (docs/dataverse-emulator.md)
    limits: Limits = field(default_factory=Limits)
    tenant_id: str | None = None
    extra_audiences: tuple[str, ...] = ()


@dataclass
class EmulatorState:
    config: DataverseConfig
    store: Store
    dv: Dataverse
    protection: ServiceProtection
    faults: FaultInjector
    requests: RequestLog
    validator: TokenValidator | None

    def reseed(self) -> None:
        apply_seed(self.dv, self.config.seed if self.config.seed is not None else demo_seed())


def _audiences(org_url: str, extra: tuple[str, ...]) -> list[str]:
    auds = {org_url.rstrip("/")}
    # The same listener answers on 127.0.0.1 and localhost; accept tokens minted for either spelling.
    if "127.0.0.1" in org_url:
        auds.add(org_url.replace("127.0.0.1", "localhost").rstrip("/"))
    elif "localhost" in org_url:
        auds.add(org_url.replace("localhost", "127.0.0.1").rstrip("/"))
    auds.update(a.rstrip("/") for a in extra)
    return sorted(auds)


def _to_response(r: ApiResponse) -> Response:
    return Response(content=r.body, status_code=r.status, headers=r.headers)


def _caller(state: EmulatorState, request: Request) -> tuple[Caller, str | None]:
    """Authenticate and resolve the effective user. Returns (caller, app id)."""
    su = ENTITIES["systemuser"]
    if state.validator is None:
        app_user = next((u for u in state.store.all(su) if u.get("applicationid")), None)
        if app_user is None:
            raise DataverseError.not_a_member()
        app_id = app_user.get("applicationid")
    else:
        try:
            token = state.validator.validate(request.headers.get("authorization"))
        except InvalidToken as exc:
            log.info("rejected bearer token: %s", exc.reason)
            raise DataverseError.unauthorized(f"The access token is invalid ({exc.reason}).") from None
        app_id = token.app_id
        users = state.store.find(su, "applicationid", app_id.lower())
        app_user = users[0] if users else None
        if app_user is None or app_user.get("isdisabled"):
            raise DataverseError.not_a_member()
    app_user_id = str(app_user["systemuserid"])
    object_id = request.headers.get("callerobjectid")
    caller_id = request.headers.get("mscrmcallerid")
    if not object_id and not caller_id:
        return Caller(user_id=app_user_id, app_id=app_id), app_id
    if "prvActOnBehalfOfAnotherUser" not in (app_user.get("~privileges") or []):
        raise DataverseError.cannot_act_on_behalf()
    if object_id:
        found = state.store.find(su, "azureactivedirectoryobjectid", object_id.strip().lower())
        target = found[0] if found else None
        missing = object_id
    else:
        target = state.store.get(su, caller_id.strip().lower()) if caller_id else None
        missing = caller_id or ""
    if target is None:
        raise DataverseError.caller_not_found(missing)
    if target.get("isdisabled"):
        raise DataverseError(403, "0x8004a110", "The impersonated user is disabled.")
    return Caller(user_id=str(target["systemuserid"]), app_user_id=app_user_id, app_id=app_id), app_id


def create_app(config: DataverseConfig) -> Starlette:
    if config.state_path != ":memory:":
        Path(config.state_path).parent.mkdir(parents=True, exist_ok=True)
    store = Store(config.state_path)
    dv = Dataverse(store, config.options, config.variant)
    validator = None
    if config.identity_url is not None:
        validator = TokenValidator(identity_url=config.identity_url,
                                   audiences=_audiences(config.org_url, config.extra_audiences),
                                   tenant_id=config.tenant_id, ca_bundle=config.ca_bundle)
    state = EmulatorState(config, store, dv, ServiceProtection(config.limits), FaultInjector(), RequestLog(),
                          validator)
    if store.count(ENTITIES["organization"]) == 0:
        state.reseed()

    async def api(request: Request) -> Response:
        started = time.perf_counter()
        method = request.method.upper()
        rel = request.path_params.get("path", "")
        target = f"{API_PATH}/{rel}" + (f"?{request.url.query}" if request.url.query else "")
        app_id: str | None = None
        protected_user: str | None = None
        try:
            caller, app_id = _caller(state, request)
            protected_user = state.protection.charged_user(caller.user_id, caller.app_user_id)
            state.protection.enter(protected_user)
            try:
                fault = state.faults.match(method, target)
                if fault is not None:
                    if fault.latency_ms > 0:
                        await asyncio.sleep(fault.latency_ms / 1000)
                    err = FaultInjector.error_for(fault)
                    if err is not None:
                        raise err
                body = await request.body()
                base = f"{request.url.scheme}://{request.url.netloc}"
                api_req = ApiRequest(method=method, path=rel, query=request.url.query,
                                     headers={k.lower(): v for k, v in request.headers.items()}, body=body,
                                     base_url=base)
                if rel.strip("/") == "$batch":
                    if method != "POST":
                        raise DataverseError.no_http_resource(f"{base}{API_PATH}/$batch")
                    result = handle_batch(dv, api_req, caller)
                else:
                    result = dv.dispatch(api_req, caller)
            finally:
                state.protection.leave(protected_user, (time.perf_counter() - started) * 1000)
        except DataverseError as err:
            result = ApiResponse.error(err)
        except Exception:  # an emulator bug must still answer in Dataverse's error shape
            log.exception("unhandled error for %s %s", method, target)
            result = ApiResponse.error(DataverseError(500, "0x80040216", "An unexpected error occurred."))
        elapsed = (time.perf_counter() - started) * 1000
        state.requests.add(method, target, result.status, elapsed, app_id)
        log.debug("%s %s -> %s (%.1f ms)", method, target, result.status, elapsed)
        response = _to_response(result)
        if protected_user is not None:
            requests_left, time_left = state.protection.remaining(protected_user)
            response.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] = str(requests_left)
            response.headers["x-ms-ratelimit-time-remaining-xrm-requests"] = str(time_left)
        return response

    # ---- emulator-only endpoints (no auth) ----------------------------------------------------------------
    async def health(_: Request) -> Response:
        counts = {e.entity_set: store.count(e) for e in ENTITIES.values()}
        return JSONResponse({"status": "ok", "org_url": config.org_url, "in_flight": state.protection.in_flight(),
                             "rows": counts, "strict": dv.options.strict})

    async def reset(_: Request) -> Response:
        store.clear()
        state.protection.reset()
        state.faults.remove(None)
        state.requests.clear()
        state.reseed()
        return JSONResponse({"status": "reset"})

    async def seed(request: Request) -> Response:
        try:
            doc = json.loads(await request.body() or b"{}")
            counts = apply_seed(dv, doc)
        except (ValueError, SeedError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"applied": counts})

    async def requests_(request: Request) -> Response:
        if request.method == "DELETE":
            state.requests.clear()
            return Response(status_code=204)
        return JSONResponse({"value": list(state.requests.entries)})

    async def faults(request: Request) -> Response:
        fid = request.path_params.get("fid")
        if request.method == "POST":
            try:
                fault = state.faults.add(json.loads(await request.body() or b"{}"))
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return JSONResponse({"id": fault.id, **fault.public()}, status_code=201)
        if request.method == "DELETE":
            found = state.faults.remove(fid)
            return Response(status_code=204 if found else 404)
        return JSONResponse({"value": [f.public() for f in state.faults.faults]})

    async def limits(request: Request) -> Response:
        if request.method == "POST":
            try:
                doc = json.loads(await request.body() or b"{}")
                if doc.get("reset"):
                    state.protection.limits = config.limits
                else:
                    state.protection.limits = state.protection.limits.scaled(doc)
                    if "per" in doc:
                        state.protection.limits = state.protection.limits.with_scope(str(doc["per"]))
                state.protection.reset()
            except (ValueError, TypeError, AttributeError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        lim = state.protection.limits
        return JSONResponse({"requests": lim.requests, "window_s": lim.window_s, "execution_ms": lim.execution_ms,
                             "concurrent": lim.concurrent, "per": lim.per})

    async def options(request: Request) -> Response:
        if request.method == "POST":
            doc = json.loads(await request.body() or b"{}")
            for k, v in doc.items():
                if not hasattr(dv.options, k):
                    return JSONResponse({"error": f"unknown option {k}"}, status_code=400)
                if k == "sendemail_outcome":
                    v = {int(m): str(o) for m, o in v.items()}
                setattr(dv.options, k, v)
        return JSONResponse({k: v for k, v in dv.options.__dict__.items()})

    async def variant(request: Request) -> Response:
        """Variant org: ``{"concurrency_off": ["email"], "nav_renames": [{"entity": "email", "nav":
        "ReceivingMailboxId_Email", "to": "receivingmailboxid"}]}`` (``"to": ""`` removes the relationship);
        ``{"reset": true}`` restores the documented org."""
        if request.method == "POST":
            try:
                doc = json.loads(await request.body() or b"{}")
                dv.variant = OrgVariant() if doc.get("reset") else OrgVariant.from_json(doc)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(dv.variant.to_json())

    methods = ["GET", "POST", "PATCH", "PUT", "DELETE"]
    routes = [
        Route("/_emulator/health", health, methods=["GET"]),
        Route("/_emulator/reset", reset, methods=["POST"]),
        Route("/_emulator/seed", seed, methods=["POST"]),
        Route("/_emulator/requests", requests_, methods=["GET", "DELETE"]),
        Route("/_emulator/faults", faults, methods=["GET", "POST", "DELETE"]),
        Route("/_emulator/faults/{fid}", faults, methods=["DELETE"]),
        Route("/_emulator/limits", limits, methods=["GET", "POST"]),
        Route("/_emulator/options", options, methods=["GET", "POST"]),
        Route("/_emulator/variant", variant, methods=["GET", "POST"]),
        Route(API_PATH, api, methods=methods),
        Route(API_PATH + "/{path:path}", api, methods=methods),
    ]
    app = Starlette(routes=routes)
    app.state.emulator = state
    return app
