"""HTTP layer of the Graph emulator: Starlette app, authentication, request log, /_emulator endpoints."""

from __future__ import annotations

import base64
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from emulators.common.tokens import InvalidToken, TokenValidator

from .api import Ctx, GraphApi, normalise_segments, parse_role_assignments
from .config import GraphConfig
from .limits import FaultRegistry, MailboxLimits, NotificationFaults
from .mail import MailService
from .notify import Notifier
from .seed import apply_seed, default_seed
from .store import Store
from .util import GraphError, GraphResponse, error_body

log = logging.getLogger("emulators.graph")

__all__ = ["GraphEmulator", "create_app"]

# GraphConfig fields that /_emulator/config may change while the emulator runs (read on every use)
RUNTIME_SETTINGS = ("delta_evict_probability", "delta_filter_cap", "batch_shuffle_responses",
                    "reauthorize_interval_s", "reauthorize_repeat_s", "reauthorize_pause_after_s",
                    "reauthorize_before_s", "slow_endpoint_throttling", "slow_notification_ms",
                    "slow_min_notifications", "slow_delay_s", "slow_window_s", "missed_after_s")
GRAPH_AUDIENCES = ("https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000")
_ALL_METHODS = ["GET", "POST", "PATCH", "PUT", "DELETE"]


class GraphEmulator:
    """Everything one emulator instance owns; ``create_app`` exposes it as ``app.state.emulator``."""

    def __init__(self, config: GraphConfig) -> None:
        self.config = config
        if config.state_dir is not None:
            config.state_dir.mkdir(parents=True, exist_ok=True)
            self.store = Store(str(config.state_dir / "graph.sqlite3"))
        else:
            self.store = Store(":memory:")
        self.mail = MailService(self.store, config)
        self.faults = FaultRegistry()
        self.notification_faults = NotificationFaults()
        self.limits = MailboxLimits(config.budget_requests, config.budget_window_s, config.concurrency_per_mailbox)
        self.notifier = Notifier(self.store, config, self.notification_faults)
        self.api = GraphApi(self.store, config, self.mail, self.notifier, self.limits, self.faults)
        self.requests: deque[dict[str, Any]] = deque(maxlen=config.request_log_size)
        self.validator: TokenValidator | None = None
        if config.auth:
            self.validator = TokenValidator(identity_url=config.identity_url, audiences=GRAPH_AUDIENCES,
                                            tenant_id=config.tenant_id, ca_bundle=config.ca_bundle, jwks=config.jwks)
        self.smtp: Any = None
        self.runtime_defaults = {k: getattr(config, k) for k in RUNTIME_SETTINGS}
        if not self.store.list_users():  # a persisted state keeps its data across restarts
            self.seed(config.seed if config.seed is not None else default_seed())

    def seed(self, seed: dict[str, Any]) -> dict[str, Any]:
        summary = apply_seed(self.store, self.mail, seed)
        for app_id, allowed in (summary.get("accessPolicies") or {}).items():
            self.set_access_policy(app_id, allowed)
        for app_id, assignments in (summary.get("roleAssignments") or {}).items():
            self.set_role_assignments(app_id, assignments)
        return summary

    def set_role_assignments(self, app_id: str, assignments: list[dict[str, Any]] | None) -> None:
        """Exchange RBAC for Applications: replace one app's role assignments (None removes them)."""
        if assignments is None:
            self.api.role_assignments.pop(app_id.lower(), None)
        else:
            self.api.role_assignments.update(parse_role_assignments({app_id: assignments}))

    def set_access_policy(self, app_id: str, allowed: list[str] | None) -> None:
        if allowed is None:
            self.api.access_policies.pop(app_id.lower(), None)
        else:
            self.api.access_policies[app_id.lower()] = {a.lower() for a in allowed}

    def reset(self, reseed: bool = True) -> None:
        self.store.reset()
        self.faults.remove()
        self.notification_faults.remove()
        self.limits.reset()
        self.api.subscription_limits.reset()
        self.notifier.reset()
        self.api.uploads.clear()
        self.api.access_policies = {a.lower(): {x.lower() for x in v} for a, v in self.config.access_policies.items()}
        self.api.role_assignments = parse_role_assignments(self.config.role_assignments)
        self.requests.clear()
        for key, value in self.runtime_defaults.items():
            setattr(self.config, key, value)
        if reseed:
            self.seed(self.config.seed if self.config.seed is not None else default_seed())

    def start(self) -> None:
        """Background parts: the notification dispatcher thread and the SMTP listener (idempotent)."""
        self.notifier.start()
        self.start_smtp()

    def stop(self) -> None:
        self.stop_smtp()
        self.notifier.stop()

    # -- SMTP ----------------------------------------------------------------------------------
    def start_smtp(self) -> None:
        if self.config.smtp_port is None or self.smtp is not None:
            return
        from .smtp import SmtpListener

        self.smtp = SmtpListener(self.config.smtp_host, self.config.smtp_port,
                                 accepts_recipient=self.mail.accepts_recipient, deliver=self._smtp_deliver)
        self.smtp.start()

    def _smtp_deliver(self, envelope_from: str, rcpts: list[str], raw: bytes) -> None:
        self.mail.deliver_inbound(envelope_from, rcpts, raw)

    def stop_smtp(self) -> None:
        if self.smtp is not None:
            self.smtp.stop()
            self.smtp = None

    # -- auth ----------------------------------------------------------------------------------
    def authenticate(self, header: str | None) -> tuple[str, str, frozenset[str]]:
        if self.validator is None:
            return "00000000-0000-0000-0000-000000000000", "", self.config.unauthenticated_roles
        try:
            token = self.validator.validate(header)
        except InvalidToken as exc:
            message = {"missing token": "Access token is empty.",
                       "expired": "Lifetime validation failed, the token is expired.",
                       "wrong audience": "Access token validation failure. Invalid audience.",
                       "wrong tenant": "Access token validation failure. Invalid tenant."}.get(
                exc.reason, f"Access token validation failure: {exc.reason}.")
            code = "InvalidAuthenticationToken"
            raise GraphError(401, code, message) from None
        return token.app_id, token.object_id, token.roles


def _base_url(request: Request, config: GraphConfig) -> str:
    if config.public_url:
        return config.public_url.rstrip("/") + "/v1.0"
    host = request.headers.get("host") or f"{request.url.hostname}:{request.url.port}"
    return f"{request.url.scheme}://{host}/v1.0"


def _to_response(resp: GraphResponse, extra: dict[str, str]) -> Response:
    headers = {**resp.headers, **extra}
    if resp.status == 204 or (not resp.body and resp.media_type is None):
        return Response(status_code=resp.status, headers=headers)
    return Response(resp.body, status_code=resp.status, headers=headers, media_type=resp.media_type)


def create_app(config: GraphConfig, emulator: GraphEmulator | None = None) -> Starlette:
    emu = emulator or GraphEmulator(config)

    async def graph(request: Request) -> Response:
        started = time.perf_counter()
        request_id = str(uuid.uuid4())
        client_request_id = request.headers.get("client-request-id") or request_id
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        path = raw_path.decode("latin-1").split("?", 1)[0]
        app_id = ""
        try:
            app_id, object_id, roles = emu.authenticate(request.headers.get("authorization"))
            query: dict[str, str] = {}
            for k, v in parse_qsl(request.url.query, keep_blank_values=True):
                # OData system query option names are case-insensitive; so is the delta changeType parameter
                query[k.lower() if k.startswith("$") or k.lower() == "changetype" else k] = v
            ctx = Ctx(method=request.method, segments=normalise_segments(path.split("/")[2:]), query=query,
                      headers={k.lower(): v for k, v in request.headers.items()}, body=await request.body(),
                      app_id=app_id, object_id=object_id, roles=roles, base_url=_base_url(request, config),
                      request_id=request_id, prefer_values=request.headers.getlist("prefer"))
            resp = await emu.api.handle(ctx)
        except GraphError as exc:
            resp = emu.api.error_response(exc, request_id, client_request_id)
        except Exception:
            log.exception("unhandled error for %s %s", request.method, path)
            resp = emu.api.error_response(GraphError(500, "generalException", "An internal error occurred."),
                                          request_id, client_request_id)
        elapsed = (time.perf_counter() - started) * 1000.0
        emu.requests.append({"method": request.method, "path": path, "status": resp.status, "ms": round(elapsed, 3),
                             "at": datetime.now(UTC).isoformat(), "app": app_id})
        return _to_response(resp, {"request-id": request_id, "client-request-id": client_request_id})

    async def upload(request: Request) -> Response:
        token = request.path_params["token"]
        authtoken = request.query_params.get("authtoken", "")
        try:
            if request.method == "DELETE":
                resp = emu.api.cancel_upload(token, authtoken)
            else:
                resp = emu.api.upload_chunk(token, authtoken, request.headers.get("content-range"),
                                            await request.body(), _base_url(request, config),
                                            request.headers.get("content-type"))
        except GraphError as exc:
            rid = str(uuid.uuid4())
            resp = emu.api.error_response(exc, rid, rid)
        return _to_response(resp, {})

    # -- /_emulator ----------------------------------------------------------------------------
    def bad(message: str, status: int = 400) -> JSONResponse:
        rid = str(uuid.uuid4())
        return JSONResponse(error_body("BadRequest", message, rid, rid), status_code=status)

    async def body_json(request: Request) -> Any:
        raw = await request.body()
        if not raw:
            return {}
        import json

        try:
            return json.loads(raw)
        except ValueError:
            raise GraphError(400, "BadRequest", "invalid JSON") from None

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "users": len(emu.store.list_users()),
                             "smtpPort": emu.smtp.port if emu.smtp is not None else None,
                             "pendingNotifications": emu.notifier.pending_count()})

    async def reset(request: Request) -> Response:
        body = await body_json(request)
        emu.reset(reseed=bool(body.get("seed", True)) if isinstance(body, dict) else True)
        return JSONResponse({"status": "reset"})

    async def seed(request: Request) -> Response:
        try:
            summary = emu.seed(await body_json(request))
        except GraphError as exc:
            return bad(exc.message)
        return JSONResponse(summary)

    async def deliver(request: Request) -> Response:
        from .mime import MimeRejected

        body = await body_json(request)
        try:
            raw = base64.b64decode(str(body.get("raw") or ""), validate=True)
        except ValueError:
            return bad("raw must be base64 MIME")
        rcpts = [str(r) for r in body.get("to") or []]
        accepted = [r for r in rcpts if emu.mail.accepts_recipient(r)]
        rejected = [r for r in rcpts if r not in accepted]
        if not accepted:
            return bad(f"550 5.1.10 no local recipient among {rcpts}")
        try:
            rows = emu.mail.deliver_inbound(str(body.get("from") or ""), accepted, raw)
        except MimeRejected as exc:
            return bad(f"554 message rejected: {exc}")
        return JSONResponse({"delivered": [{"userId": r.user_id, "id": r.rid, "immutableId": r.iid,
                                            "internetMessageId": r.data.get("internetMessageId")} for r in rows],
                             "rejected": rejected}, status_code=202)

    async def outbox(request: Request) -> Response:
        if request.method == "DELETE":
            emu.store.clear_outbox()
            return Response(status_code=204)
        return JSONResponse(emu.store.list_outbox())

    async def requests_log(request: Request) -> Response:
        if request.method == "DELETE":
            emu.requests.clear()
            return Response(status_code=204)
        return JSONResponse({"value": list(emu.requests)})

    def fault_endpoint(registry: FaultRegistry | NotificationFaults) -> Callable[[Request], Awaitable[Response]]:
        """POST adds a fault (201 + id), GET lists them, DELETE [/id] removes one or all."""

        async def endpoint(request: Request) -> Response:
            fault_id = request.path_params.get("fault_id")
            if request.method == "POST":
                try:
                    fault = registry.add(await body_json(request))
                except GraphError as exc:
                    return bad(exc.message)
                return JSONResponse({"id": fault.id}, status_code=201)
            if request.method == "DELETE":
                return Response(status_code=204 if registry.remove(fault_id) else 404)
            return JSONResponse({"value": registry.list()})

        return endpoint

    faults = fault_endpoint(emu.faults)
    notification_faults = fault_endpoint(emu.notification_faults)

    async def lifecycle(request: Request) -> Response:
        body = await body_json(request)
        event = str(body.get("event") or "")
        if event not in ("missed", "subscriptionRemoved", "reauthorizationRequired"):
            return bad("event must be missed, subscriptionRemoved or reauthorizationRequired")
        sub = emu.store.get_subscription(str(body.get("subscriptionId") or ""))
        if sub is None:
            return bad("unknown subscriptionId", 404)
        if not emu.notifier.fire_lifecycle(sub, event):
            return bad("the subscription has no lifecycleNotificationUrl")
        if event == "subscriptionRemoved":  # the event means Graph removed it: do so
            emu.store.delete_subscription(sub["id"])
            emu.notifier.invalidate()
        elif event == "reauthorizationRequired":  # a real challenge: unanswered, notifications pause
            now = time.time()

            def challenged(stored: dict[str, Any]) -> bool:
                stored["_challengedSince"] = stored.get("_challengedSince") or now
                stored["_challengedAt"] = now
                return True

            emu.store.update_subscription(sub["id"], challenged)
            emu.notifier.invalidate()
        return JSONResponse({"queued": True}, status_code=202)

    async def runtime_config(request: Request) -> Response:
        """GET the runtime-tunable settings, POST some of them (e.g. chaos runs switch delta eviction on)."""
        if request.method == "POST":
            body = await body_json(request)
            if not isinstance(body, dict) or any(k not in RUNTIME_SETTINGS for k in body):
                return bad(f"settings must be a JSON object with keys among {', '.join(RUNTIME_SETTINGS)}")
            for key, value in body.items():
                setattr(config, key, value)
            emu.notifier.invalidate()
        return JSONResponse({k: getattr(config, k) for k in RUNTIME_SETTINGS})

    async def access_policy(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse({k: sorted(v) for k, v in emu.api.access_policies.items()})
        body = await body_json(request)
        if not body.get("app_id"):
            return bad("app_id is required")
        allowed = body.get("allowed")
        emu.set_access_policy(str(body["app_id"]), [str(a) for a in allowed] if allowed is not None else None)
        return JSONResponse({"app_id": body["app_id"], "allowed": allowed})

    async def role_assignments(request: Request) -> Response:
        """Exchange RBAC for Applications (New-ManagementRoleAssignment -App): {"app_id", "assignments":
        [{"role": "Application Mail.ReadWrite", "scope": [...]}]} (null removes them)."""
        if request.method == "GET":
            return JSONResponse({app: {role: sorted(scope) for role, scope in roles.items()}
                                 for app, roles in emu.api.role_assignments.items()})
        body = await body_json(request)
        if not body.get("app_id"):
            return bad("app_id is required")
        try:
            emu.set_role_assignments(str(body["app_id"]), body.get("assignments"))
        except GraphError as exc:
            return bad(exc.message)
        return JSONResponse({"app_id": body["app_id"], "assignments": body.get("assignments")})

    async def subscriptions(request: Request) -> Response:
        return JSONResponse({"value": emu.store.list_subscriptions()})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        emu.start()  # idempotent: start_graph() starts the emulator itself and serves with lifespan="off"
        try:
            yield
        finally:
            emu.stop()

    routes = [
        Route("/v1.0/{rest:path}", graph, methods=_ALL_METHODS),
        Route("/upload/AttachmentSessions/{token}", upload, methods=["PUT", "DELETE"]),
        Route("/_emulator/health", health, methods=["GET"]),
        Route("/_emulator/reset", reset, methods=["POST"]),
        Route("/_emulator/seed", seed, methods=["POST"]),
        Route("/_emulator/deliver", deliver, methods=["POST"]),
        Route("/_emulator/outbox", outbox, methods=["GET", "DELETE"]),
        Route("/_emulator/requests", requests_log, methods=["GET", "DELETE"]),
        Route("/_emulator/faults", faults, methods=["GET", "POST", "DELETE"]),
        Route("/_emulator/faults/{fault_id}", faults, methods=["DELETE"]),
        Route("/_emulator/notification-faults", notification_faults, methods=["GET", "POST", "DELETE"]),
        Route("/_emulator/notification-faults/{fault_id}", notification_faults, methods=["DELETE"]),
        Route("/_emulator/lifecycle", lifecycle, methods=["POST"]),
        Route("/_emulator/access-policy", access_policy, methods=["GET", "POST"]),
        Route("/_emulator/role-assignments", role_assignments, methods=["GET", "POST"]),
        Route("/_emulator/subscriptions", subscriptions, methods=["GET"]),
        Route("/_emulator/config", runtime_config, methods=["GET", "POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.emulator = emu
    return app
