"""The /v1.0 surface: routing, roles, mailbox scoping, throttling, faults and every handler.

Requests arrive as :class:`Ctx` (already authenticated by the HTTP layer, or built for one item of a
JSON ``$batch``) and leave as :class:`GraphResponse`, so ``$batch`` runs items through exactly the same
code path as direct calls. Routes are matched on normalised path segments: ``mailFolders('Inbox')``
becomes ``mailFolders/Inbox``, ``delta()`` becomes ``delta``, nested ``childFolders/{id}`` collapse onto
the innermost folder id and ``mailFolders/{f}/messages/{id}`` onto ``messages/{id}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlencode, urlsplit

from .config import GraphConfig
from .limits import FaultRegistry, MailboxLimits, SubscriptionLimits
from .mail import DRAFT_HEADERS, MailService, _ci
from .notify import Notifier, check_notification_url
from .odata import Prefer, check_orderby_against_filter, compile_filter, parse_expand, parse_orderby, parse_prefer
from .render import normalise_select, render_attachment, render_message, sort_rows
from .store import Folder, MessageRow, Store, User
from .util import GraphError, GraphResponse, error_body, format_dt7, json_response, new_id, now_utc, parse_dt

__all__ = ["Ctx", "GraphApi", "normalise_segments"]

READ = frozenset({"Mail.Read", "Mail.ReadWrite"})
READ_BASIC = READ | {"Mail.ReadBasic", "Mail.ReadBasic.All"}
WRITE = frozenset({"Mail.ReadWrite"})
SEND = frozenset({"Mail.Send"})
RULES_READ = frozenset({"MailboxSettings.Read", "MailboxSettings.ReadWrite"})
RULES_WRITE = frozenset({"MailboxSettings.ReadWrite"})
USERS = frozenset({"User.Read.All", "User.ReadWrite.All", "User.ReadBasic.All", "Directory.Read.All",
                   "Directory.ReadWrite.All"})
# App-only message subscriptions: Learn lists Mail.ReadBasic too, but with it they fail in practice
# (microsoft-graph-docs-contrib#3802; audit graph-fidelity #20): the stricter reading.
SUBS = READ
ANY: frozenset[str] = frozenset()
ACCESS_DENIED = "Access is denied. Check credentials and try again."
# The mailbox permissions "Exchange RBAC for Applications" can assign on a management scope (auth-limit-mailbox-
# access); such grants live in Exchange, not in the token's roles.
RBAC_ROLES = frozenset({"Mail.Read", "Mail.ReadBasic", "Mail.ReadWrite", "Mail.Send", "MailboxSettings.Read",
                        "MailboxSettings.ReadWrite"})


def parse_role_assignments(raw: Mapping[str, Any]) -> dict[str, dict[str, set[str]]]:
    """``{app id: [{"role": "Application Mail.ReadWrite", "scope": ["alice@contoso.example" | object id | "*"]}]}``
    (the shape of ``New-ManagementRoleAssignment -App -Role -CustomResourceScope``) -> app -> role -> scope keys."""
    out: dict[str, dict[str, set[str]]] = {}
    for app_id, assignments in (raw or {}).items():
        if not isinstance(assignments, list):
            raise GraphError(400, "BadRequest", "roleAssignments: each app maps to a list of assignments.")
        roles = out.setdefault(str(app_id).lower(), {})
        for assignment in assignments:
            role = str((assignment or {}).get("role") or "").removeprefix("Application ").strip()
            scope = (assignment or {}).get("scope", ["*"])
            if role not in RBAC_ROLES or not isinstance(scope, list):
                raise GraphError(400, "BadRequest", f"roleAssignments: unknown role {role!r} or scope not a list.")
            roles.setdefault(role, set()).update(str(k).lower() for k in scope)
    return out


@dataclass
class Ctx:
    method: str
    segments: list[str]
    query: dict[str, str]  # option names lower-cased ("$select"); values decoded
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    app_id: str
    object_id: str
    roles: frozenset[str]
    base_url: str  # absolute, ending in /v1.0
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    prefer_values: list[str] = field(default_factory=list)
    in_batch: bool = False
    _prefer: Prefer | None = None

    @property
    def prefer(self) -> Prefer:
        if self._prefer is None:
            self._prefer = parse_prefer(self.prefer_values)
        return self._prefer

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError:
            raise GraphError(400, "BadRequest", "Unable to read JSON request payload. Please ensure Content-Type "
                                                "header is set and payload is of valid JSON format.") from None


_FUNC = re.compile(r"^([A-Za-z][\w.]*)\((?:'((?:[^']|'')*)')?\)$")


def normalise_segments(raw_segments: list[str]) -> list[str]:
    out: list[str] = []
    for raw in raw_segments:
        if raw == "":
            continue
        seg = unquote(raw)
        m = _FUNC.match(seg)
        if m:
            name = m.group(1)
            out.append("delta" if name.lower() in ("delta", "microsoft.graph.delta") else name)
            if m.group(2) is not None:
                out.append(m.group(2).replace("''", "'"))
        else:
            out.append(seg)
    # collapse mailFolders/{a}/childFolders/{b} -> mailFolders/{b}
    collapsed: list[str] = []
    i = 0
    while i < len(out):
        seg = out[i]
        if seg.lower() == "childfolders" and i + 1 < len(out) and len(collapsed) >= 2 and \
                collapsed[-2].lower() == "mailfolders":
            collapsed[-1] = out[i + 1]
            i += 2
            continue
        collapsed.append(seg)
        i += 1
    if len(collapsed) >= 6 and collapsed[0].lower() == "users" and collapsed[2].lower() == "mailfolders" and \
            collapsed[4].lower() == "messages" and collapsed[5].lower() != "delta":
        collapsed = collapsed[:2] + collapsed[4:]
    return collapsed


Handler = Callable[..., Awaitable[GraphResponse]]


@dataclass(frozen=True)
class _Route:
    method: str
    parts: tuple[str | None, ...]  # literal (lower case) or None for a parameter
    names: tuple[str, ...]
    handler: Handler
    roles: frozenset[str]
    directory: bool = False  # an Entra directory read (/users): no mailbox scoping, no Outlook limits


class GraphApi:
    def __init__(self, store: Store, config: GraphConfig, mail: MailService, notifier: Notifier,
                 limits: MailboxLimits, faults: FaultRegistry) -> None:
        self.store = store
        self.config = config
        self.mail = mail
        self.notifier = notifier
        self.limits = limits
        self.faults = faults
        self.access_policies: dict[str, set[str]] = {
            app.lower(): {a.lower() for a in allowed} for app, allowed in config.access_policies.items()}
        self.role_assignments = parse_role_assignments(config.role_assignments)
        self.uploads: dict[str, dict[str, Any]] = {}
        self.subscription_limits = SubscriptionLimits(
            config.subscription_window_s, config.subscription_writes_per_app, config.subscription_writes_per_tenant,
            config.subscription_requests_per_app, config.subscription_requests_per_tenant)
        self.random = random.Random(config.shuffle_seed)
        self._routes: dict[tuple[str, int], list[_Route]] = {}
        self._paths: dict[int, list[_Route]] = {}
        u = "users/{user}"
        m = f"{u}/messages/{{message}}"
        f = f"{u}/mailFolders/{{folder}}"
        table: list[tuple[str, str, Handler, frozenset[str]]] = [
            ("POST", "$batch", self.batch, ANY),
            ("GET", "users", self.list_users, USERS),
            ("GET", u, self.get_user, USERS),
            ("GET", f"{u}/mailFolders", self.list_folders, READ_BASIC),
            ("POST", f"{u}/mailFolders", self.create_folder, WRITE),
            ("GET", f, self.get_folder, READ_BASIC),
            ("GET", f"{f}/childFolders", self.list_folders, READ_BASIC),
            ("POST", f"{f}/childFolders", self.create_folder, WRITE),
            ("GET", f"{f}/messages", self.list_messages, READ_BASIC),
            ("POST", f"{f}/messages", self.create_message, WRITE),
            ("GET", f"{f}/messages/delta", self.delta, READ_BASIC),
            ("GET", f"{f}/messageRules", self.list_rules, RULES_READ),
            ("POST", f"{f}/messageRules", self.create_rule, RULES_WRITE),
            ("GET", f"{f}/messageRules/{{rule}}", self.get_rule, RULES_READ),
            ("PATCH", f"{f}/messageRules/{{rule}}", self.update_rule, RULES_WRITE),
            ("DELETE", f"{f}/messageRules/{{rule}}", self.delete_rule, RULES_WRITE),
            ("GET", f"{u}/messages", self.list_messages, READ_BASIC),
            ("POST", f"{u}/messages", self.create_message, WRITE),
            ("POST", f"{u}/sendMail", self.send_mail, SEND),
            ("GET", m, self.get_message, READ_BASIC),
            ("PATCH", m, self.update_message, WRITE),
            ("DELETE", m, self.delete_message, WRITE),
            ("GET", f"{m}/$value", self.get_message_mime, READ),
            ("POST", f"{m}/move", self.move_message, WRITE),
            ("POST", f"{m}/copy", self.copy_message, WRITE),
            ("POST", f"{m}/send", self.send_draft, SEND),
            ("GET", f"{m}/attachments", self.list_attachments, READ),
            ("POST", f"{m}/attachments", self.add_attachment, WRITE),
            ("POST", f"{m}/attachments/createUploadSession", self.create_upload_session, WRITE),
            ("GET", f"{m}/attachments/{{attachment}}", self.get_attachment, READ),
            ("DELETE", f"{m}/attachments/{{attachment}}", self.delete_attachment, WRITE),
            ("GET", f"{m}/attachments/{{attachment}}/$value", self.get_attachment_value, READ),
            ("GET", "subscriptions", self.list_subscriptions, ANY),
            # the mailbox of a subscription is in its resource: the handlers check SUBS for that mailbox
            ("POST", "subscriptions", self.create_subscription, ANY),
            ("GET", "subscriptions/{subscription}", self.get_subscription, ANY),
            ("PATCH", "subscriptions/{subscription}", self.update_subscription, ANY),
            ("DELETE", "subscriptions/{subscription}", self.delete_subscription, ANY),
            ("POST", "subscriptions/{subscription}/reauthorize", self.reauthorize_subscription, ANY),
        ]
        for method, pattern, handler, roles in table:
            parts: list[str | None] = []
            names: list[str] = []
            for seg in pattern.split("/"):
                if seg.startswith("{"):
                    parts.append(None)
                    names.append(seg.strip("{}"))
                else:
                    parts.append(seg.lower())
            route = _Route(method, tuple(parts), tuple(names), handler, roles, directory=roles is USERS)
            self._routes.setdefault((method, len(parts)), []).append(route)
            self._paths.setdefault(len(parts), []).append(route)

    # -- dispatch ------------------------------------------------------------------------------
    @staticmethod
    def _match(route: _Route, segs: list[str]) -> dict[str, str] | None:
        params: dict[str, str] = {}
        names = iter(route.names)
        for part, seg in zip(route.parts, segs, strict=True):
            if part is None:
                params[next(names)] = seg
            elif part != seg.lower():
                return None
        return params

    def _find(self, method: str, segs: list[str]) -> tuple[_Route, dict[str, str]]:
        for route in self._routes.get((method, len(segs)), ()):
            params = self._match(route, segs)
            if params is not None:
                return route, params
        for route in self._paths.get(len(segs), ()):
            if self._match(route, segs) is not None:
                raise GraphError(405, "Request_BadRequest", f"The HTTP method '{method}' is not allowed for this "
                                                            "resource.")
        if segs and segs[0].lower() == "me":
            raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")
        last = segs[-1] if segs else ""
        raise GraphError(400, "BadRequest", f"Resource not found for the segment '{last}'.")

    def check_mailbox_access(self, app_id: str, user: User) -> None:
        allowed = self.access_policies.get(app_id.lower())
        if allowed is not None and user.upn.lower() not in allowed and user.mail.lower() not in allowed \
                and user.id.lower() not in allowed:
            # Application access policy / RBAC for Applications scope (graph.md §9)
            raise GraphError(403, "ErrorAccessDenied", "Access to OData is disabled.")

    def resolve_user(self, key: str) -> User:
        """``/users/{id | userPrincipalName}``: nothing else names a mailbox (message-get and every Outlook page);
        a primary SMTP address that differs from the UPN is not a key (audit graph-fidelity #3)."""
        user = self.store.get_user(key)
        if user is None:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{key}' is invalid.")
        return user

    def _directory_user(self, key: str) -> User:
        user = self.store.get_user(key)
        if user is None:
            raise GraphError(404, "Request_ResourceNotFound", f"Resource '{key}' does not exist or one of its "
                                                              "queried reference-property objects are not present.")
        return user

    def mailbox_roles(self, ctx: Ctx, user: User) -> frozenset[str]:
        """The token's roles plus what Exchange RBAC for Applications assigns this app on this mailbox."""
        assigned = self.role_assignments.get(ctx.app_id.lower())
        if not assigned:
            return ctx.roles
        keys = {"*", user.id.lower(), user.upn.lower(), user.mail.lower()}
        return ctx.roles | {role for role, scope in assigned.items() if scope & keys}

    def require_mailbox_roles(self, ctx: Ctx, user: User, roles: frozenset[str]) -> None:
        if roles and not (self.mailbox_roles(ctx, user) & roles):
            raise GraphError(403, "ErrorAccessDenied", ACCESS_DENIED)

    async def handle(self, ctx: Ctx) -> GraphResponse:
        route, params = self._find(ctx.method, ctx.segments)
        user_key = params.pop("user", None)
        if route.directory:
            if not (ctx.roles & route.roles):
                raise GraphError(403, "Authorization_RequestDenied",
                                 "Insufficient privileges to complete the operation.")
            fault = self.faults.match(ctx.method, "/v1.0/" + "/".join(ctx.segments))
            extra = {"user": self._directory_user(user_key)} if user_key is not None else {}
            return await self._run(route, ctx, {**extra, **params}, fault)
        if not route.roles or ctx.roles & route.roles:
            user = self.resolve_user(user_key) if user_key is not None else None
        elif user_key is not None and self.role_assignments.get(ctx.app_id.lower()):
            # no token role: only an Exchange RBAC for Applications assignment on this mailbox can grant it
            user = self.resolve_user(user_key)
            self.require_mailbox_roles(ctx, user, route.roles)
        else:
            raise GraphError(403, "ErrorAccessDenied", ACCESS_DENIED)
        if route.parts[0] == "subscriptions":
            self.subscription_limits.check(ctx.app_id, ctx.method)
        fault = self.faults.match(ctx.method, "/v1.0/" + "/".join(ctx.segments))
        if user is None:
            return await self._run(route, ctx, params, fault)
        self.check_mailbox_access(ctx.app_id, user)
        self.limits.acquire(ctx.app_id, user.id)
        try:
            return await self._run(route, ctx, {"user": user, **params}, fault)
        finally:
            self.limits.release(ctx.app_id, user.id)

    @staticmethod
    async def _run(route: _Route, ctx: Ctx, params: dict[str, Any], fault: Any) -> GraphResponse:
        if fault is not None:
            if fault.latency_ms:
                await asyncio.sleep(fault.latency_ms / 1000.0)
            if fault.status:
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(int(fault.retry_after) if float(fault.retry_after).is_integer()
                                                 else fault.retry_after)
                raise GraphError(fault.status, fault.error_code or "InternalServerError",
                                 fault.message or "Injected fault.", headers=headers)
        return await route.handler(ctx, **params)

    def error_response(self, exc: GraphError, request_id: str, client_request_id: str) -> GraphResponse:
        resp = json_response(error_body(exc.code, exc.message, request_id, client_request_id), exc.status,
                             exc.headers)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = ('Bearer realm="", authorization_uri="https://login.microsoftonline'
                                                '.com/common/oauth2/authorize", client_id="00000003-0000-0000-c000-'
                                                '000000000000"')
        return resp

    # -- helpers -------------------------------------------------------------------------------
    def _folder(self, user: User, ref: str) -> Folder:
        folder = self.store.folder(user.id, ref)
        if folder is None:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return folder

    def _message(self, user: User, message_id: str) -> MessageRow:
        row = self.store.get_message(user.id, message_id)
        if row is None:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return row

    @staticmethod
    def _context(ctx: Ctx, tail: str) -> str:
        return f"{ctx.base_url}/$metadata#{tail}"

    def _render(self, ctx: Ctx, row: MessageRow, *, select: list[str] | None = None, with_type: bool = False,
                expand: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
        if expand is None:
            expand = parse_expand(ctx.query.get("$expand"))
        return render_message(self.store, row, select=select if select is not None else
                              normalise_select(ctx.query.get("$select")), expand=expand,
                              immutable=ctx.prefer.immutable_id, body_type=ctx.prefer.body_content_type,
                              base_url=ctx.base_url, with_type=with_type)

    def _prefer_headers(self, ctx: Ctx) -> dict[str, str]:
        applied = []
        if ctx.prefer.body_content_type:
            applied.append(f'outlook.body-content-type="{ctx.prefer.body_content_type}"')
        if ctx.prefer.immutable_id:
            applied.append('IdType="ImmutableId"')
        return {"Preference-Applied": ", ".join(applied)} if applied else {}

    def _page_size(self, ctx: Ctx) -> int:
        raw = ctx.query.get("$top")
        if raw is None:
            return ctx.prefer.max_page_size or self.config.default_page_size
        try:
            top = int(raw)
        except ValueError:
            raise GraphError(400, "BadRequest", f"Invalid $top value '{raw}'.") from None
        if top < 1:
            raise GraphError(400, "BadRequest", "$top must be a positive number.")
        return min(top, self.config.max_page_size)

    def _next_link(self, ctx: Ctx, skip: int) -> str:
        query = {k: v for k, v in ctx.query.items() if k != "$skip"}
        query["$skip"] = str(skip)
        path = "/".join(quote(s, safe="@:'()") for s in ctx.segments)
        return f"{ctx.base_url}/{path}?{urlencode(query, quote_via=quote, safe='$,')}"

    # -- directory -----------------------------------------------------------------------------
    @staticmethod
    def _select_user(user: User, select: str | None) -> dict[str, Any]:
        data = user.to_graph(select=[s.strip() for s in select.split(",")] if select else None)
        return data

    async def list_users(self, ctx: Ctx) -> GraphResponse:
        """Directory reads are not scoped by Exchange (access policies and RBAC scopes cover mailbox data only).
        ``proxyAddresses/any(...)`` and ``$count=true`` are "advanced queries": ``ConsistencyLevel: eventual``
        required (Learn: aad-advanced-queries)."""
        users = self.store.list_users()
        advanced = ctx.headers.get("consistencylevel", "").lower() == "eventual"
        text = ctx.query.get("$filter")
        if ((text and re.search(r"/any\s*\(", text, re.I)) or ctx.query.get("$count")) and not advanced:
            raise GraphError(400, "Request_UnsupportedQuery",
                             "Unsupported query: it needs the ConsistencyLevel header set to 'eventual'.")
        if text:
            node = compile_filter(text)
            users = [u for u in users if node(u.filter_view())]
        body: dict[str, Any] = {"@odata.context": self._context(ctx, "users")}
        if str(ctx.query.get("$count", "")).lower() == "true":
            body["@odata.count"] = len(users)
        body["value"] = [self._select_user(u, ctx.query.get("$select")) for u in users]
        return json_response(body)

    async def get_user(self, ctx: Ctx, user: User) -> GraphResponse:
        body = {"@odata.context": self._context(ctx, "users/$entity"),
                **self._select_user(user, ctx.query.get("$select"))}
        return json_response(body)

    # -- folders -------------------------------------------------------------------------------
    def _render_folder(self, folder: Folder) -> dict[str, Any]:
        total, unread, children = self.store.folder_counts(folder.id)
        return {"id": folder.id, "displayName": folder.display_name, "parentFolderId": folder.parent_id,
                "childFolderCount": children, "unreadItemCount": unread, "totalItemCount": total,
                "isHidden": folder.hidden}

    async def list_folders(self, ctx: Ctx, user: User, folder: str | None = None) -> GraphResponse:
        parent = self._folder(user, folder).id if folder else None
        folders = [self._render_folder(f) for f in self.store.child_folders(user.id, parent)]
        top = self._page_size(ctx) if "$top" in ctx.query else 1000
        skip = int(ctx.query.get("$skip", "0") or 0)
        body: dict[str, Any] = {"@odata.context": self._context(ctx, f"users('{user.id}')/mailFolders"),
                                "value": folders[skip:skip + top]}
        if skip + top < len(folders):
            body["@odata.nextLink"] = self._next_link(ctx, skip + top)
        return json_response(body)

    async def get_folder(self, ctx: Ctx, user: User, folder: str) -> GraphResponse:
        return json_response({"@odata.context": self._context(ctx, f"users('{user.id}')/mailFolders/$entity"),
                              **self._render_folder(self._folder(user, folder))})

    async def create_folder(self, ctx: Ctx, user: User, folder: str | None = None) -> GraphResponse:
        body = ctx.json()
        name = str(_ci(body, "displayName") or "").strip()
        if not name:
            raise GraphError(400, "ErrorInvalidRequest", "displayName is required.")
        parent = self._folder(user, folder).id if folder else None
        siblings = self.store.child_folders(user.id, parent)
        if any(f.display_name.lower() == name.lower() for f in siblings):
            raise GraphError(409, "ErrorFolderExists", "A folder with the specified name already exists.")
        created = self.store.create_folder(user.id, parent, name)
        return json_response({"@odata.context": self._context(ctx, f"users('{user.id}')/mailFolders/$entity"),
                              **self._render_folder(created)}, 201)

    # -- messages ------------------------------------------------------------------------------
    async def list_messages(self, ctx: Ctx, user: User, folder: str | None = None) -> GraphResponse:
        fold = self._folder(user, folder) if folder else None
        rows = self.store.list_messages(user.id, fold.id if fold else None)
        if ctx.query.get("$filter"):
            node = compile_filter(ctx.query["$filter"], "message")
            rows = [r for r in rows if node({**r.data, "id": r.rid, "parentFolderId": r.folder_id})]
        check_orderby_against_filter(ctx.query.get("$filter"), parse_orderby(ctx.query.get("$orderby")))
        order = parse_orderby(ctx.query.get("$orderby")) or [("receivedDateTime", True)]
        rows = sorted(rows, key=lambda r: r.ord, reverse=True)  # stable tie-break: newest first
        rows = sort_rows(rows, order, lambda r: r.data)
        top = self._page_size(ctx)
        try:
            skip = int(ctx.query.get("$skip", "0") or 0)
        except ValueError:
            raise GraphError(400, "BadRequest", "Invalid $skip value.") from None
        select = normalise_select(ctx.query.get("$select"))
        expand = parse_expand(ctx.query.get("$expand"))
        value = [self._render(ctx, r, select=select, expand=expand) for r in rows[skip:skip + top]]
        where = f"mailFolders('{fold.id}')/messages" if fold else "messages"
        body: dict[str, Any] = {"@odata.context": self._context(ctx, f"users('{user.id}')/{where}"), "value": value}
        if skip + top < len(rows):
            body["@odata.nextLink"] = self._next_link(ctx, skip + top)
        return json_response(body, headers=self._prefer_headers(ctx))

    async def get_message(self, ctx: Ctx, user: User, message: str) -> GraphResponse:
        row = self._message(user, message)
        select = normalise_select(ctx.query.get("$select"))
        tail = f"users('{user.id}')/messages" + (f"({','.join(select)})" if select else "") + "/$entity"
        body = {"@odata.context": self._context(ctx, tail), **self._render(ctx, row, select=select)}
        return json_response(body, headers=self._prefer_headers(ctx))

    async def get_message_mime(self, ctx: Ctx, user: User, message: str) -> GraphResponse:
        row = self._message(user, message)
        return GraphResponse(200, self.mail.mime_of(row), {}, "text/plain")

    _PATCHABLE: ClassVar[dict[str, str]] = {
                  "isread": "isRead", "categories": "categories", "flag": "flag", "importance": "importance",
                  "inferenceclassification": "inferenceClassification",
                  "isdeliveryreceiptrequested": "isDeliveryReceiptRequested",
                  "isreadreceiptrequested": "isReadReceiptRequested"}
    _DRAFT_ONLY: ClassVar[dict[str, str]] = {"subject": "subject", "body": "body", "torecipients": "toRecipients",
                   "ccrecipients": "ccRecipients", "bccrecipients": "bccRecipients", "replyto": "replyTo",
                   "from": "from", "sender": "sender", "internetmessageheaders": "internetMessageHeaders",
                   "internetmessageid": "internetMessageId"}

    async def update_message(self, ctx: Ctx, user: User, message: str) -> GraphResponse:
        from .mail import _recipient, chosen_internet_message_id, validate_custom_headers
        from .render import body_preview

        row = self._message(user, message)
        body = ctx.json()
        if not isinstance(body, dict):
            raise GraphError(400, "BadRequest", "The request body must be a JSON object.")
        changes: dict[str, Any] = {}
        for key, value in body.items():
            low = key.lower()
            if low.startswith("@odata"):
                continue
            if low in self._PATCHABLE:
                changes[self._PATCHABLE[low]] = value
            elif low in self._DRAFT_ONLY:
                if not row.data.get("isDraft"):
                    raise GraphError(400, "ErrorInvalidPropertyUpdateSentMessage",
                                     f"Update is not allowed for property '{key}' on a message that isn't a draft.")
                name = self._DRAFT_ONLY[low]
                if name in ("toRecipients", "ccRecipients", "bccRecipients", "replyTo"):
                    value = [_recipient(r) for r in value or []]
                elif name in ("from", "sender"):
                    value = _recipient(value)
                elif name == "internetMessageHeaders":
                    # a draft keeps them for its MIME; Graph shows no internetMessageHeaders on it (graph.md §7.2)
                    changes[DRAFT_HEADERS] = validate_custom_headers(value)
                    continue
                elif name == "internetMessageId":
                    value = chosen_internet_message_id(value)
                elif name == "body":
                    value = {"contentType": str(_ci(value, "contentType") or "text").lower(),
                             "content": str(_ci(value, "content") or "")}
                    changes["bodyPreview"] = body_preview(value)
                changes[name] = value
            else:
                raise GraphError(400, "ErrorInvalidPropertyRequest",
                                 f"The property '{key}' does not exist or cannot be updated.")
        if "isRead" in changes and not isinstance(changes["isRead"], bool):
            raise GraphError(400, "BadRequest", "isRead must be a boolean.")
        if "categories" in changes and not (isinstance(changes["categories"], list)
                                            and all(isinstance(c, str) for c in changes["categories"])):
            raise GraphError(400, "BadRequest", "categories must be a collection of strings.")
        row = self.store.update_message(row, changes)
        return json_response({"@odata.context": self._context(ctx, f"users('{user.id}')/messages/$entity"),
                              **self._render(ctx, row)})

    async def delete_message(self, ctx: Ctx, user: User, message: str) -> GraphResponse:
        # Graph's DELETE is a soft delete into Recoverable Items (not the visible Deleted Items folder):
        # for every client it is gone, which is what removing it here reproduces.
        self.store.delete_message(self._message(user, message))
        return GraphResponse(204)

    def _destination(self, ctx: Ctx, user: User) -> Folder:
        body = ctx.json()
        dest = _ci(body, "destinationId") if isinstance(body, dict) else None
        if not dest:
            raise GraphError(400, "ErrorInvalidIdMalformed", "destinationId is required.")
        return self._folder(user, str(dest))

    async def move_message(self, ctx: Ctx, user: User, message: str) -> GraphResponse:
        row = self._message(user, message)
        moved = self.store.move_message(row, self._destination(ctx, user).id)
        return json_response({"@odata.context": self._context(ctx, f"users('{user.id}')/messages/$entity"),
                              **self._render(ctx, moved, select=None, expand={})}, 201)

    async def copy_message(self, ctx: Ctx, user: User, message: str) -> GraphResponse:
        row = self._message(user, message)
        dest = self._destination(ctx, user)
        copy = self.store.insert_message(user.id, dest.id, dict(row.data), raw=self.store.raw_mime(row.iid))
        self.store.copy_attachments(row.iid, copy.iid)
        copy = self.store.update_message(copy, {})
        return json_response({"@odata.context": self._context(ctx, f"users('{user.id}')/messages/$entity"),
                              **self._render(ctx, copy, select=None, expand={})}, 201)

    async def create_message(self, ctx: Ctx, user: User, folder: str | None = None) -> GraphResponse:
        row = self.mail.create_draft(user, ctx.json(), folder or "drafts")
        return json_response({"@odata.context": self._context(ctx, f"users('{user.id}')/messages/$entity"),
                              **self._render(ctx, row, select=None, expand={})}, 201)

    async def send_draft(self, ctx: Ctx, user: User, message: str) -> GraphResponse:
        self.mail.send_draft(user, self._message(user, message))
        return GraphResponse(202)

    async def send_mail(self, ctx: Ctx, user: User) -> GraphResponse:
        if ctx.headers.get("content-type", "").lower().startswith("text/plain"):
            self.mail.send_mime(user, ctx.body)
            return GraphResponse(202)
        body = ctx.json()
        message = _ci(body, "message") if isinstance(body, dict) else None
        if not isinstance(message, dict):
            raise GraphError(400, "ErrorInvalidParameter", "The 'message' parameter is required.")
        save = _ci(body, "saveToSentItems", True)
        self.mail.send_mail(user, message, save is not False)
        return GraphResponse(202)

    # -- attachments ---------------------------------------------------------------------------
    async def list_attachments(self, ctx: Ctx, user: User, message: str) -> GraphResponse:
        row = self._message(user, message)
        expand = parse_expand(ctx.query.get("$expand"))
        item_opts = expand.get("microsoft.graph.itemattachment/item")
        value = [render_attachment(aid, meta, content, expand_item=item_opts is not None, item_expand_opts=item_opts)
                 for aid, meta, content in self.store.list_attachments(row.iid)]
        return json_response({"@odata.context": self._context(
            ctx, f"users('{user.id}')/messages('{row.id_for(ctx.prefer.immutable_id)}')/attachments"),
            "value": value})

    def _attachment(self, row: MessageRow, attachment: str) -> tuple[str, dict[str, Any], bytes | None]:
        found = self.store.get_attachment(row.iid, attachment)
        if found is None:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return found

    async def get_attachment(self, ctx: Ctx, user: User, message: str, attachment: str) -> GraphResponse:
        row = self._message(user, message)
        aid, meta, content = self._attachment(row, attachment)
        expand = parse_expand(ctx.query.get("$expand"))
        item_opts = expand.get("microsoft.graph.itemattachment/item")
        body = render_attachment(aid, meta, content, expand_item=item_opts is not None, item_expand_opts=item_opts)
        return json_response({"@odata.context": self._context(
            ctx, f"users('{user.id}')/messages('{row.id_for(ctx.prefer.immutable_id)}')/attachments/$entity"),
            **body})

    async def get_attachment_value(self, ctx: Ctx, user: User, message: str, attachment: str) -> GraphResponse:
        row = self._message(user, message)
        _aid, meta, content = self._attachment(row, attachment)
        if str(meta.get("@odata.type", "")).lower().endswith("itemattachment"):
            return GraphResponse(200, self.mail.mime_of_item(meta.get("item") or {}), {}, "text/plain")
        return GraphResponse(200, content or b"", {}, str(meta.get("contentType") or "application/octet-stream"))

    async def add_attachment(self, ctx: Ctx, user: User, message: str) -> GraphResponse:
        row = self._message(user, message)
        att = self.mail._attachment_from_payload(ctx.json())
        aid = self.store.add_attachment(row, att)
        _aid, meta, content = self._attachment(row, aid)
        return json_response({"@odata.context": self._context(
            ctx, f"users('{user.id}')/messages('{row.id_for(ctx.prefer.immutable_id)}')/attachments/$entity"),
            **render_attachment(aid, meta, content, expand_item=False)}, 201)

    async def delete_attachment(self, ctx: Ctx, user: User, message: str, attachment: str) -> GraphResponse:
        row = self._message(user, message)
        if not self.store.delete_attachment(row, attachment):
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return GraphResponse(204)

    async def create_upload_session(self, ctx: Ctx, user: User, message: str) -> GraphResponse:
        row = self._message(user, message)
        body = ctx.json()
        item = _ci(body, "AttachmentItem") if isinstance(body, dict) else None
        if not isinstance(item, dict):
            raise GraphError(400, "ErrorInvalidRequest", "AttachmentItem is required.")
        if str(_ci(item, "attachmentType") or "file").lower() != "file":
            raise GraphError(400, "ErrorInvalidRequest", "Only attachmentType 'file' supports upload sessions.")
        name = str(_ci(item, "name") or "")
        try:
            size = int(_ci(item, "size"))
        except (TypeError, ValueError):
            raise GraphError(400, "ErrorInvalidRequest", "AttachmentItem.size is required.") from None
        if not name or size <= 0:
            raise GraphError(400, "ErrorInvalidRequest", "AttachmentItem needs a name and a positive size.")
        if size > self.config.max_upload_session_bytes:
            raise GraphError(400, "ErrorAttachmentSizeLimitExceeded",
                             "The attachment exceeds the maximum size of 150 MB.")
        token = secrets.token_urlsafe(24)
        expires = now_utc() + timedelta(seconds=self.config.upload_session_ttl_s)
        self.uploads[token] = {"user_id": user.id, "iid": row.iid, "name": name, "size": size,
                               "contentType": str(_ci(item, "contentType") or "application/octet-stream"),
                               "isInline": bool(_ci(item, "isInline") or False), "contentId": _ci(item, "contentId"),
                               "data": bytearray(), "expires": expires, "auth": secrets.token_urlsafe(32)}
        session = self.uploads[token]
        root = ctx.base_url.rsplit("/v1.0", 1)[0]
        upload_url = f"{root}/upload/AttachmentSessions/{token}?authtoken={session['auth']}"
        return json_response({"@odata.context": self._context(ctx, "microsoft.graph.uploadSession"),
                              "uploadUrl": upload_url, "expirationDateTime": format_dt7(expires),
                              "nextExpectedRanges": ["0-"]}, 201)

    def upload_chunk(self, token: str, authtoken: str, content_range: str | None, chunk: bytes, base_url: str,
                     content_type: str | None = None) -> GraphResponse:
        """PUT to the pre-authenticated upload URL (no bearer token; the authtoken query is the credential)."""
        session = self.uploads.get(token)
        if session is None or not secrets.compare_digest(session["auth"], authtoken or "") \
                or session["expires"] <= now_utc():
            self.uploads.pop(token, None) if session is not None and session["expires"] <= now_utc() else None
            raise GraphError(404, "ErrorItemNotFound", "The upload session was not found or has expired.")
        if (content_type or "").split(";")[0].strip().lower() != "application/octet-stream":
            # outlook-large-attachments: "Content-Type ... Specify application/octet-stream. Required."
            raise GraphError(400, "invalidRequest", "The Content-Type header must be application/octet-stream.")
        if len(chunk) >= self.config.max_upload_chunk_bytes:
            # "keep each byte range less than 4 MB" (the stricter, decimal reading)
            raise GraphError(400, "invalidRange", f"Each byte range must be smaller than "
                                                  f"{self.config.max_upload_chunk_bytes} bytes (4 MB).")
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", (content_range or "").strip())
        if not m:
            raise GraphError(400, "invalidRequest", "A valid Content-Range header is required.")
        start, end, total = (int(g) for g in m.groups())
        data: bytearray = session["data"]
        if total != session["size"] or end < start or end >= total:
            raise GraphError(400, "invalidRange", "The Content-Range does not match the upload session.")
        if len(chunk) != end - start + 1:
            raise GraphError(400, "invalidRequest", "The Content-Length does not match the Content-Range.")
        if start != len(data):
            raise GraphError(416, "invalidRange", "Uploaded fragment overlaps with existing data."
                             if start < len(data) else "Uploaded fragment does not start at the expected offset.")
        data.extend(chunk)
        if len(data) < session["size"]:
            # the Learn example's shape: the Outlook v2.0 context, "ExpirationDateTime", the next start offset
            return json_response({"@odata.context": f"{base_url.rsplit('/v1.0', 1)[0]}/api/v2.0/$metadata#Users("
                                                    f"'{session['user_id']}')/Messages/AttachmentSessions/$entity",
                                  "ExpirationDateTime": format_dt7(session["expires"]),
                                  "nextExpectedRanges": [str(len(data))]})
        del self.uploads[token]
        row = self.store.get_message_by_iid(session["iid"])
        if row is None:
            raise GraphError(404, "ErrorItemNotFound", "The message of this upload session no longer exists.")
        aid = self.store.add_attachment(row, {"@odata.type": "#microsoft.graph.fileAttachment", "name": session["name"],
                                              "contentType": session["contentType"], "isInline": session["isInline"],
                                              "contentId": session["contentId"]}, bytes(data))
        location = f"{base_url}/users('{session['user_id']}')/messages('{row.rid}')/attachments('{aid}')"
        return GraphResponse(201, b"", {"Location": location})

    def cancel_upload(self, token: str, authtoken: str) -> GraphResponse:
        session = self.uploads.get(token)
        if session is None or not secrets.compare_digest(session["auth"], authtoken or ""):
            raise GraphError(404, "ErrorItemNotFound", "The upload session was not found or has expired.")
        del self.uploads[token]
        return GraphResponse(204)

    # -- delta ---------------------------------------------------------------------------------
    _RESETS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("syncStateNotFound", "The sync state generation is not found. The delta token is expired and data must "
                              "be synchronized again."),
        ("resyncRequired", "The delta token is no longer valid, and the app must reset the sync state."),
        ("SyncStateInvalid", "The sync state is invalid. Data must be synchronized again."),
    )

    def _gone(self, ctx: Ctx, user: User, folder: Folder, reset: tuple[str, str] | None = None) -> GraphError:
        code, message = reset or self._RESETS[0]
        location = f"{ctx.base_url}/users/{user.id}/mailFolders('{folder.id}')/messages/delta?$deltatoken="
        return GraphError(410, code, message, headers={"Location": location})

    async def delta(self, ctx: Ctx, user: User, folder: str) -> GraphResponse:
        fold = self._folder(user, folder)
        skiptoken = ctx.query.get("$skiptoken")
        deltatoken = ctx.query.get("$deltatoken")
        state: dict[str, Any] | None
        if skiptoken or deltatoken:
            state = self.store.load_delta_state(skiptoken or deltatoken or "", self.config.delta_token_ttl_s)
            if state is None or state.get("folder") != fold.id:
                raise self._gone(ctx, user, fold)
            if self.config.delta_evict_probability and self.random.random() < self.config.delta_evict_probability:
                # chaos: Exchange's delta token cache evicted this sync state early ("lifetime isn't fixed")
                raise self._gone(ctx, user, fold, self.random.choice(self._RESETS))
            if deltatoken:
                state = self._delta_round(state, fold)
        else:
            state = self._initial_round(ctx, fold)
        immutable = ctx.prefer.immutable_id or bool(state.get("immutable"))
        page_size = ctx.prefer.max_page_size or state.get("page") or self.config.default_page_size
        remaining: list[list[str]] = state["remaining"]
        take, rest = remaining[:page_size], remaining[page_size:]
        select = normalise_select(state.get("select"))
        value: list[dict[str, Any]] = []
        for iid, kind, rid in take:
            if kind == "removed":
                value.append({"@odata.type": "#microsoft.graph.message", "id": iid if immutable else rid,
                              "@removed": {"reason": "deleted"}})
                continue
            row = self.store.get_message_by_iid(iid)
            if row is None or row.folder_id != fold.id:
                continue  # gone since the snapshot: the next round reports the removal
            value.append(render_message(self.store, row, select=select, expand={}, immutable=immutable,
                                        body_type=ctx.prefer.body_content_type, base_url=ctx.base_url,
                                        with_type=True))
        link_base = f"{ctx.base_url}/users/{user.id}/mailFolders('{fold.id}')/messages/delta"
        body: dict[str, Any] = {"@odata.context": self._context(ctx, "Collection(message)")}
        common = {k: state.get(k) for k in ("folder", "select", "changeType", "filter", "page", "seq")}
        common["immutable"] = immutable
        if rest:
            token = self.store.save_delta_state({**common, "remaining": rest})
            body["@odata.nextLink"] = f"{link_base}?$skiptoken={token}"
        else:
            token = self.store.save_delta_state({**common, "remaining": []})
            body["@odata.deltaLink"] = f"{link_base}?$deltatoken={token}"
        body["value"] = value
        return json_response(body, headers=self._prefer_headers(ctx))

    def _initial_round(self, ctx: Ctx, fold: Folder) -> dict[str, Any]:
        filter_text = ctx.query.get("$filter")
        if filter_text and not re.fullmatch(r"\s*receivedDateTime\s+(ge|gt)\s+\S+\s*", filter_text, re.I):
            raise GraphError(400, "ErrorInvalidUrlQueryFilter",
                             "Delta on messages supports only $filter=receivedDateTime ge|gt {value}.")
        change_type = (ctx.query.get("changetype") or "").lower() or None
        if change_type not in (None, "created", "updated", "deleted"):
            raise GraphError(400, "BadRequest", "changeType must be created, updated or deleted.")
        order_text = ctx.query.get("$orderby")
        if order_text is not None and not re.fullmatch(r"\s*receivedDateTime\s+desc\s*", order_text, re.I):
            raise GraphError(400, "ErrorInvalidUrlQuery",
                             "Delta on messages supports only $orderby=receivedDateTime desc.")
        select_text = ctx.query.get("$select")
        normalise_select(select_text)  # validate now, not on the next page
        seq = self.store.max_seq()
        rows = self.store.list_messages(fold.user_id, fold.id)
        if filter_text:
            node = compile_filter(filter_text)
            rows = [r for r in rows if node(r.data)]
        if order_text:
            rows.sort(key=lambda r: (str(r.data.get("receivedDateTime") or ""), r.ord), reverse=True)
        else:
            # "If you don't include an $orderby expression, the return order isn't guaranteed": never newest first
            self.random.shuffle(rows)
        if filter_text:
            # "Applying $filter in a delta query returns only up to 5,000 messages"
            rows = rows[:self.config.delta_filter_cap]
        remaining = [] if change_type in ("updated", "deleted") else [[r.iid, "item", r.rid] for r in rows]
        page = None
        if "$top" in ctx.query:
            page = self._page_size(ctx)
        return {"folder": fold.id, "seq": seq, "select": select_text, "changeType": change_type,
                "filter": filter_text, "page": page or ctx.prefer.max_page_size, "immutable": ctx.prefer.immutable_id,
                "remaining": remaining}

    def _delta_round(self, state: dict[str, Any], fold: Folder) -> dict[str, Any]:
        upto = self.store.max_seq()
        per: dict[str, dict[str, Any]] = {}
        for seq, iid, rid, kind in self.store.changes(fold.id, int(state.get("seq") or 0), upto):
            entry = per.setdefault(iid, {"created": False, "rid": rid, "seq": seq})
            entry["created"] = entry["created"] or kind == "created"
            entry["rid"] = rid
            entry["seq"] = seq
        wanted = state.get("changeType")
        remaining: list[list[str]] = []
        for iid, entry in sorted(per.items(), key=lambda kv: kv[1]["seq"]):
            row = self.store.get_message_by_iid(iid)
            present = row is not None and row.folder_id == fold.id
            if present:
                kind = "created" if entry["created"] else "updated"
                if wanted in (None, kind):
                    remaining.append([iid, "item", row.rid if row else entry["rid"]])
            elif not entry["created"] and wanted in (None, "deleted"):
                # created and removed within the same round: the client never saw it, Graph omits it
                remaining.append([iid, "removed", entry["rid"]])
        return {**state, "seq": upto, "remaining": remaining}

    # -- inbox rules ---------------------------------------------------------------------------
    def _rules_folder(self, user: User, folder: str) -> None:
        if self._folder(user, folder).well_known != "inbox":
            raise GraphError(400, "ErrorInvalidRequest", "Message rules exist only on the Inbox folder.")

    @staticmethod
    def _rule_out(rule: dict[str, Any]) -> dict[str, Any]:
        return {"id": rule["id"], "displayName": rule.get("displayName"), "sequence": rule.get("sequence"),
                "isEnabled": rule.get("isEnabled", True), "hasError": False, "isReadOnly": False,
                "conditions": rule.get("conditions") or {}, "actions": rule.get("actions") or {},
                "exceptions": rule.get("exceptions") or {}}

    async def list_rules(self, ctx: Ctx, user: User, folder: str) -> GraphResponse:
        self._rules_folder(user, folder)
        return json_response({"@odata.context": self._context(ctx, f"users('{user.id}')/mailFolders('inbox')/"
                                                                   "messageRules"),
                              "value": [self._rule_out(r) for r in self.store.list_rules(user.id)]})

    def _find_rule(self, user: User, rule_id: str) -> dict[str, Any]:
        for rule in self.store.list_rules(user.id):
            if rule["id"] == rule_id:
                return rule
        raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")

    async def get_rule(self, ctx: Ctx, user: User, folder: str, rule: str) -> GraphResponse:
        self._rules_folder(user, folder)
        return json_response(self._rule_out(self._find_rule(user, rule)))

    @staticmethod
    def _rule_fields(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise GraphError(400, "BadRequest", "The request body must be a JSON object.")
        out: dict[str, Any] = {}
        for key in ("displayName", "sequence", "isEnabled", "conditions", "actions", "exceptions"):
            value = _ci(body, key)
            if value is not None:
                out[key] = value
        return out

    async def create_rule(self, ctx: Ctx, user: User, folder: str) -> GraphResponse:
        self._rules_folder(user, folder)
        fields = self._rule_fields(ctx.json())
        if not fields.get("displayName") or not isinstance(fields.get("actions"), dict):
            raise GraphError(400, "ErrorInvalidRequest", "A rule needs displayName and actions.")
        existing = self.store.list_rules(user.id)
        fields.setdefault("sequence", max((int(r.get("sequence") or 0) for r in existing), default=0) + 1)
        rule = {"id": new_id("rule", 12), "isEnabled": True, **fields}
        self.store.put_rule(user.id, rule)
        return json_response(self._rule_out(rule), 201)

    async def update_rule(self, ctx: Ctx, user: User, folder: str, rule: str) -> GraphResponse:
        self._rules_folder(user, folder)
        current = self._find_rule(user, rule)
        current.update(self._rule_fields(ctx.json()))
        self.store.put_rule(user.id, current)
        return json_response(self._rule_out(current))

    async def delete_rule(self, ctx: Ctx, user: User, folder: str, rule: str) -> GraphResponse:
        self._rules_folder(user, folder)
        if not self.store.delete_rule(user.id, rule):
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return GraphResponse(204)

    # -- subscriptions -------------------------------------------------------------------------
    _RESOURCE = re.compile(
        r"^/?(?P<root>users|me)(?:/(?P<user>[^/(]+)|\('(?P<user2>[^']+)'\))?"
        r"(?:/mailfolders(?:/(?P<folder>[^/(]+)|\('(?P<folder2>[^']+)'\)))?/messages/?(?:\?(?P<query>.*))?$",
        re.I)

    def _parse_resource(self, ctx: Ctx, resource: Any) -> tuple[User, Folder | None, str | None]:
        if not isinstance(resource, str) or not resource.strip():
            raise GraphError(400, "InvalidRequest", "resource is required.")
        m = self._RESOURCE.match(unquote(resource.strip()))
        if not m:
            raise GraphError(400, "InvalidRequest", f"Unsupported resource '{resource}'. Use users/{{id}}/messages or "
                                                    "users/{id}/mailFolders('{id}')/messages.")
        if m.group("root").lower() == "me":
            raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")
        user_key = m.group("user") or m.group("user2")
        if not user_key:
            raise GraphError(400, "InvalidRequest", f"Unsupported resource '{resource}'.")
        user = self.resolve_user(user_key)
        self.require_mailbox_roles(ctx, user, SUBS)
        self.check_mailbox_access(ctx.app_id, user)
        folder_key = m.group("folder") or m.group("folder2")
        folder = self._folder(user, folder_key) if folder_key else None
        filter_text = None
        if m.group("query"):
            for part in m.group("query").split("&"):
                name, _, value = part.partition("=")
                if name.strip().lower() == "$filter":
                    filter_text = unquote(value)
                    compile_filter(filter_text, "message")
        return user, folder, filter_text

    def _expiry(self, value: Any) -> str:
        if not isinstance(value, str):
            raise GraphError(400, "InvalidRequest", "expirationDateTime is required.")
        try:
            when = parse_dt(value)
        except ValueError:
            raise GraphError(400, "InvalidRequest", f"Invalid expirationDateTime '{value}'.") from None
        now = now_utc()
        if when <= now:
            raise GraphError(400, "InvalidRequest", "Subscription expiration must be in the future.")
        if when > now + timedelta(minutes=self.config.max_subscription_minutes, seconds=60):
            raise GraphError(400, "ExtensionError", f"Subscription expiration can only be "
                                                    f"{self.config.max_subscription_minutes} minutes in the future.")
        floor = now + timedelta(minutes=self.config.min_subscription_minutes)
        return format_dt7(max(when, floor))

    @staticmethod
    def _public_sub(sub: dict[str, Any], *, with_client_state: bool = True) -> dict[str, Any]:
        keys = ("id", "resource", "applicationId", "changeType", "clientState", "notificationUrl",
                "notificationQueryOptions", "lifecycleNotificationUrl",
                "expirationDateTime", "creatorId", "includeResourceData", "latestSupportedTlsVersion",
                "encryptionCertificate", "encryptionCertificateId", "notificationUrlAppId")
        out = {k: sub.get(k) for k in keys}
        if not with_client_state:
            # subscription-list: "the clientState property value is not returned for security purposes"
            out["clientState"] = None
        return out

    @staticmethod
    def _authorised(sub: dict[str, Any]) -> None:
        """Created, renewed or reauthorized now: the next reauthorization challenge is one token lifetime away
        and a pending one (and any pause of its notifications) is answered."""
        sub["_authorizedAt"] = time.time()
        sub["_challengedAt"] = None
        sub["_challengedSince"] = None

    def _sub_for_app(self, ctx: Ctx, sub_id: str, *, write: bool = False) -> dict[str, Any]:
        sub = self.store.get_subscription(sub_id)
        if sub is None or sub.get("applicationId", "").lower() != ctx.app_id.lower():
            raise GraphError(404, "ResourceNotFound", f"The object was not found. Subscription '{sub_id}'.")
        if write:
            user = self.store.get_user(str(sub.get("_userId") or ""))
            if user is not None:
                self.require_mailbox_roles(ctx, user, SUBS)
        return sub

    async def create_subscription(self, ctx: Ctx) -> GraphResponse:
        body = ctx.json()
        if not isinstance(body, dict):
            raise GraphError(400, "BadRequest", "The request body must be a JSON object.")
        change_type = _ci(body, "changeType")
        kinds = [k.strip().lower() for k in str(change_type or "").split(",") if k.strip()]
        if not kinds or any(k not in ("created", "updated", "deleted") for k in kinds):
            raise GraphError(400, "InvalidRequest", "changeType must be a comma-separated list of created, updated, "
                                                    "deleted.")
        url = check_notification_url(_ci(body, "notificationUrl"), self.config)
        lifecycle = _ci(body, "lifecycleNotificationUrl")
        if lifecycle is not None:
            lifecycle = check_notification_url(lifecycle, self.config, "lifecycleNotificationUrl")
        client_state = _ci(body, "clientState")
        if client_state is not None and (not isinstance(client_state, str) or len(client_state) > 128):
            raise GraphError(400, "InvalidRequest", "clientState must be a string of at most 128 characters.")
        if _ci(body, "includeResourceData"):
            raise GraphError(400, "NotSupported", "Rich notifications (includeResourceData) are not supported by "
                                                  "this emulator.")
        tls = _ci(body, "latestSupportedTlsVersion") or "v1_2"
        if tls not in ("v1_0", "v1_1", "v1_2", "v1_3"):
            raise GraphError(400, "InvalidRequest", f"Invalid latestSupportedTlsVersion '{tls}'.")
        expires = self._expiry(_ci(body, "expirationDateTime"))
        user, folder, filter_text = self._parse_resource(ctx, _ci(body, "resource"))
        if self.store.count_subscriptions(user.id) >= self.config.subscriptions_per_mailbox:
            raise GraphError(403, "ExtensionError", "The number of subscriptions for this mailbox has reached the "
                                                    f"limit of {self.config.subscriptions_per_mailbox}.")
        await self.notifier.validate_endpoint(url)
        if lifecycle:
            await self.notifier.validate_endpoint(lifecycle)
        sub = {"id": str(uuid.uuid4()), "resource": _ci(body, "resource"), "applicationId": ctx.app_id,
               "changeType": ",".join(kinds), "clientState": client_state, "notificationUrl": url,
               "notificationQueryOptions": None,
               "lifecycleNotificationUrl": lifecycle, "expirationDateTime": expires, "creatorId": ctx.object_id,
               "includeResourceData": None, "latestSupportedTlsVersion": tls, "encryptionCertificate": None,
               "encryptionCertificateId": None, "notificationUrlAppId": None,
               "_userId": user.id, "_folderId": folder.id if folder else None,
               "_immutable": ctx.prefer.immutable_id, "_filter": filter_text}
        self._authorised(sub)
        self.store.put_subscription(sub)
        self.notifier.added(sub)
        return json_response({"@odata.context": self._context(ctx, "subscriptions/$entity"), **self._public_sub(sub)},
                             201)

    async def list_subscriptions(self, ctx: Ctx) -> GraphResponse:
        subs = [self._public_sub(s, with_client_state=False) for s in self.store.list_subscriptions(ctx.app_id)]
        top = self.config.max_page_size if "$top" not in ctx.query else self._page_size(ctx)
        skip = int(ctx.query.get("$skip", "0") or 0)
        body: dict[str, Any] = {"@odata.context": self._context(ctx, "subscriptions"), "value": subs[skip:skip + top]}
        if skip + top < len(subs):
            body["@odata.nextLink"] = self._next_link(ctx, skip + top)
        return json_response(body)

    async def get_subscription(self, ctx: Ctx, subscription: str) -> GraphResponse:
        sub = self._sub_for_app(ctx, subscription)
        return json_response({"@odata.context": self._context(ctx, "subscriptions/$entity"), **self._public_sub(sub)})

    async def update_subscription(self, ctx: Ctx, subscription: str) -> GraphResponse:
        sub = self._sub_for_app(ctx, subscription, write=True)
        body = ctx.json()
        if not isinstance(body, dict):
            raise GraphError(400, "BadRequest", "The request body must be a JSON object.")
        if _ci(body, "lifecycleNotificationUrl") is not None and \
                _ci(body, "lifecycleNotificationUrl") != sub.get("lifecycleNotificationUrl"):
            raise GraphError(400, "InvalidRequest", "lifecycleNotificationUrl cannot be added or changed by PATCH; "
                                                    "recreate the subscription.")
        if _ci(body, "expirationDateTime") is not None:
            sub["expirationDateTime"] = self._expiry(_ci(body, "expirationDateTime"))
            sub["_reauthNotified"] = False
        self._authorised(sub)  # "renewing your subscription also reauthorizes" (lifecycle events page)
        new_url = _ci(body, "notificationUrl")
        if new_url is not None and new_url != sub["notificationUrl"]:
            sub["notificationUrl"] = check_notification_url(new_url, self.config)
            await self.notifier.validate_endpoint(sub["notificationUrl"])
        elif self.config.revalidate_on_renew:
            await self.notifier.validate_endpoint(sub["notificationUrl"])
        self.store.put_subscription(sub)
        self.notifier.invalidate()
        return json_response({"@odata.context": self._context(ctx, "subscriptions/$entity"), **self._public_sub(sub)})

    async def delete_subscription(self, ctx: Ctx, subscription: str) -> GraphResponse:
        self._sub_for_app(ctx, subscription)
        self.store.delete_subscription(subscription)
        self.notifier.invalidate()
        return GraphResponse(204)

    async def reauthorize_subscription(self, ctx: Ctx, subscription: str) -> GraphResponse:
        sub = self._sub_for_app(ctx, subscription, write=True)
        sub["_reauthNotified"] = False
        self._authorised(sub)
        self.store.put_subscription(sub)
        self.notifier.invalidate()
        return GraphResponse(204)

    # -- $batch --------------------------------------------------------------------------------
    async def batch(self, ctx: Ctx) -> GraphResponse:
        if ctx.in_batch:
            raise GraphError(400, "BadRequest", "Nested batch requests are not supported.")
        body = ctx.json()
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise GraphError(400, "BadRequest", "Invalid batch payload format.")
        if len(requests) > 20:
            raise GraphError(400, "BadRequest", "Number of requests in the batch exceeds the limit of 20.")
        seen: set[str] = set()
        for req in requests:
            rid = str(req.get("id") or "") if isinstance(req, dict) else ""
            if not rid or rid.lower() in seen:
                raise GraphError(400, "BadRequest", "Batch request ids must be present and unique.")
            seen.add(rid.lower())
            if not isinstance(req.get("method"), str) or not isinstance(req.get("url"), str):
                raise GraphError(400, "BadRequest", f"Request '{rid}' needs method and url.")
            deps = req.get("dependsOn")
            if deps is not None and (not isinstance(deps, list) or any(str(d).lower() not in seen - {rid.lower()}
                                                                       for d in deps)):
                # stricter reading: a dependency must name a request earlier in the batch (no cycles possible)
                raise GraphError(400, "BadRequest", f"Request '{rid}' has an invalid dependsOn: it must list ids of "
                                                    "requests earlier in the batch.")
        # Items without dependsOn run concurrently ("the server [processes] requests in the batch in the most
        # efficient order"); an item with dependsOn starts when its dependencies are done, 424 if one failed.
        finished: dict[str, asyncio.Event] = {str(r["id"]).lower(): asyncio.Event() for r in requests}
        statuses: dict[str, int] = {}
        responses: list[dict[str, Any]] = []

        async def run(req: dict[str, Any]) -> None:
            rid = str(req["id"])
            try:
                deps = [str(d).lower() for d in req.get("dependsOn") or []]
                for dep in deps:
                    await finished[dep].wait()
                if any(statuses.get(dep, 424) >= 400 for dep in deps):
                    statuses[rid.lower()] = 424
                    responses.append({"id": rid, "status": 424, "headers": {"Content-Type": "application/json"},
                                      "body": error_body("FailedDependency", "Dependent request failed.",
                                                         ctx.request_id, ctx.request_id)})
                    return
                resp = await self._batch_item(ctx, req)
                statuses[rid.lower()] = resp.status
                responses.append(self._batch_response(rid, resp))
            finally:
                finished[rid.lower()].set()

        await asyncio.gather(*(run(r) for r in requests))
        if self.config.batch_shuffle_responses:
            self.random.shuffle(responses)  # "Individual responses might appear in a different order"
        return json_response({"responses": responses})

    @staticmethod
    def _batch_response(rid: str, resp: GraphResponse) -> dict[str, Any]:
        out: dict[str, Any] = {"id": rid, "status": resp.status}
        headers = dict(resp.headers)
        if resp.media_type:
            headers["Content-Type"] = resp.media_type
        out["headers"] = headers
        if resp.body:
            if resp.media_type and resp.media_type.startswith("application/json"):
                out["body"] = json.loads(resp.body)
            else:
                out["body"] = base64.b64encode(resp.body).decode()
        return out

    async def _batch_item(self, ctx: Ctx, req: dict[str, Any]) -> GraphResponse:
        parts = urlsplit(req["url"] if req["url"].startswith("/") else "/" + req["url"])
        path = parts.path
        if path.lower().startswith("/v1.0/"):
            path = path[5:]
        headers = {str(k).lower(): str(v) for k, v in (req.get("headers") or {}).items()}
        body = req.get("body")
        if body is None:
            raw = b""
        elif isinstance(body, dict | list):
            raw = json.dumps(body).encode()
        elif headers.get("content-type", "").startswith("application/json"):
            raw = str(body).encode()
        else:
            try:
                raw = base64.b64decode(str(body))
            except ValueError:
                raw = str(body).encode()
        from urllib.parse import parse_qsl

        query = {k.lower() if k.startswith("$") or k.lower() == "changetype" else k: v
                 for k, v in parse_qsl(parts.query, keep_blank_values=True)}
        sub = Ctx(method=str(req["method"]).upper(), segments=normalise_segments(path.split("/")), query=query,
                  headers=headers, body=raw, app_id=ctx.app_id, object_id=ctx.object_id, roles=ctx.roles,
                  base_url=ctx.base_url, request_id=ctx.request_id,
                  prefer_values=[headers["prefer"]] if "prefer" in headers else [], in_batch=True)
        try:
            return await self.handle(sub)
        except GraphError as exc:
            return self.error_response(exc, ctx.request_id, ctx.request_id)
