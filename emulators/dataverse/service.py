"""The Web API operations, independent of HTTP framing so ``$batch`` parts and top-level requests share one path.

``Dataverse.dispatch(ApiRequest, Caller) -> ApiResponse`` routes ``/api/data/v9.2/<path>`` to create / retrieve /
query / update / delete / actions / metadata. Business rules live here: deep insert of parties and attachments,
binds, read-only columns, state/status pairs, etags, duplicate keys, attachment size, SendEmail and tracking tokens.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fnmatch
import json
import re
import sqlite3
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from . import metadata
from .errors import DataverseError
from .odata import ExpandItem, Prefer, parse_expand, parse_filter, parse_orderby, parse_prefer, parse_select
from .query import run_query
from .schema import (
    BOOL,
    DATETIME,
    DECIMAL,
    ENTITIES,
    GUID,
    INT,
    LOOKUP,
    MEMO,
    MONEY,
    OPTIONSET,
    STATE,
    STATUS,
    STRING,
    Column,
    EntityDef,
    NavProperty,
    entity_by_set,
)
from .store import Row, Store

__all__ = ["ApiRequest", "ApiResponse", "Caller", "Dataverse", "Options", "OrgVariant"]

API_PATH = "/api/data/v9.2"
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_SEGMENT = re.compile(r"^(?P<name>[A-Za-z_$][\w.$]*)(?:\((?P<key>.*)\))?$", re.S)
EMAIL_COLUMN = {"contact": "emailaddress1", "account": "emailaddress1", "lead": "emailaddress1",
                "systemuser": "internalemailaddress", "queue": "emailaddress"}
_SYNCED_METHOD_COLUMNS = ("incomingemaildeliverymethod", "outgoingemaildeliverymethod", "emailrouteraccessapproval")
ROUTER_METHOD = 2  # "Server-Side Synchronization or Email Router"


@dataclass
class Options:
    """Switches for behaviour the reference marks NOT VERIFIED (documented in docs/dataverse-emulator.md)."""

    # Read-only columns in a payload (IsValidForCreate/IsValidForUpdate false): real Dataverse ignores them
    # silently. strict=True (default) makes the emulator refuse them (400) as a lint, so the router never relies on
    # a value that production would drop; strict=False behaves like Dataverse (ignored).
    strict: bool = True
    duplicate_status: int = 412  # HTTP status of 0x80040237 "A record with matching key values already exists."
    # A failed change set is answered as ONE plain application/http part; captured real responses carry no Content-ID
    # (microsoft/powerapps-tools#574, #100). True echoes the failing operation's Content-ID (the older emulator).
    echo_content_id_on_failure: bool = False
    # A bind to a missing record: "A record with the specified key values does not exist in <entity> entity".
    # Status and code NOT VERIFIED; 400 is the stricter reading (a client that only re-plans on 404 breaks).
    missing_bind_status: int = 400
    missing_bind_code: str = "0x80040217"
    # SendEmail IssueSend=true outcome by the sender's outgoingemaildeliverymethod: "pending" (statecode 1 /
    # statuscode 6), "sent" (1/3) or "error" (400). NOT VERIFIED for 0 (None): Microsoft Q&A / support blogs say the
    # email "will stay in Pending Send if email integration and the user's mailbox are not correctly configured",
    # so the default is "pending" (the router must then leave it alone: the stricter test of the router).
    sendemail_outcome: dict[int, str] = field(default_factory=lambda: {0: "pending", 1: "pending", 2: "pending"})
    # Whether the platform fills the read-only senton ("Date Sent") when a status change puts an email in Sent
    # {1,3}. NOT VERIFIED: SSS marks sent mail Sent "through a 'SetState' operation" (SupportArticles-docs
    # sssadminprod.md) and its sent mail shows a Date Sent, but SSS may stamp it internally. Default False, the
    # stricter reading (nothing the router does fills it); True models the platform doing it.
    # `emailrouter doctor --sandbox` reports what a real org does.
    senton_on_sent_status: bool = False
    email_party_masks: tuple[int, ...] = (1, 2, 3, 4)  # 8 Regarding / 9 Owner are platform-maintained -> rejected
    allow_state_on_create: bool = True  # statecode/statuscode in the create POST (NOT VERIFIED): accepted if valid
    # counter width when organization.maximumtrackingnumber is unset (the seed sets 999: three digits)
    tracking_counter_digits: int = 3


@dataclass
class OrgVariant:
    """Switches that make the emulated org differ from the documented default, as real orgs can.

    Set through ``DataverseConfig`` / ``POST /_admin/variant`` so tests and ``emailrouter doctor`` can see a
    variant org: optimistic concurrency off on a table, a relationship's navigation property renamed (or removed
    with an empty new name).
    """

    concurrency_off: set[str] = field(default_factory=set)  # logical names with IsOptimisticConcurrencyEnabled false
    # (logical name, declared nav name) -> replacement name ("" = the relationship is not declared in this org)
    nav_renames: dict[tuple[str, str], str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"concurrency_off": sorted(self.concurrency_off),
                "nav_renames": [{"entity": e, "nav": n, "to": t} for (e, n), t in sorted(self.nav_renames.items())]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> OrgVariant:
        return cls(set(doc.get("concurrency_off") or ()),
                   {(r["entity"], r["nav"]): str(r.get("to") or "") for r in doc.get("nav_renames") or ()})

    def navs(self, ent: EntityDef) -> dict[str, NavProperty]:
        if not self.nav_renames:
            return ent.navs
        out: dict[str, NavProperty] = {}
        for name, nav in ent.navs.items():
            new = self.nav_renames.get((ent.logical_name, name), name)
            if new:
                out[new] = NavProperty(new, nav.column, nav.targets, nav.relationships)
        return out

    def many_to_one(self, ent: EntityDef) -> list[dict[str, str]]:
        out = []
        for rel in ent.many_to_one:
            new = self.nav_renames.get((ent.logical_name, rel["navigation_property"]), rel["navigation_property"])
            if new:
                out.append({**rel, "navigation_property": new})
        return out


@dataclass
class Caller:
    user_id: str  # effective systemuserid (the impersonated user when impersonating)
    app_user_id: str | None = None  # the application user that called (set when impersonating)
    app_id: str | None = None


@dataclass
class ApiRequest:
    method: str
    path: str  # decoded, relative to /api/data/v9.2/ (no leading slash)
    query: str  # raw query string
    headers: dict[str, str]  # lower-case names
    body: bytes = b""
    base_url: str = ""  # https://host:port (the org URL)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def params(self) -> dict[str, str]:
        return dict(parse_qsl(self.query, keep_blank_values=True))

    @property
    def api_url(self) -> str:
        return self.base_url + API_PATH


@dataclass
class ApiResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def json(cls, status: int, obj: Any, headers: dict[str, str] | None = None) -> ApiResponse:
        h = {"Content-Type": "application/json; odata.metadata=minimal", "OData-Version": "4.0"}
        h.update(headers or {})
        return cls(status, h, json.dumps(obj, separators=(",", ":")).encode())

    @classmethod
    def error(cls, err: DataverseError) -> ApiResponse:
        h = {"Content-Type": "application/json; odata.metadata=minimal", "OData-Version": "4.0", **err.headers}
        return cls(err.status, h, json.dumps(err.body(), separators=(",", ":")).encode())


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def etag(row: Row) -> str:
    return f'W/"{row["versionnumber"]}"'


class Dataverse:
    def __init__(self, store: Store, options: Options | None = None, variant: OrgVariant | None = None, *,
                 system_writes: bool = False) -> None:
        self.store = store
        self.options = options or Options()
        self.variant = variant or OrgVariant()
        # Seeds describe state the platform itself wrote: they may set columns no API client can (read-only ones).
        self.system_writes = system_writes

    def navs(self, ent: EntityDef) -> dict[str, NavProperty]:
        """The single-valued navigation properties this org declares on ``ent`` (exact, case-sensitive)."""
        return self.variant.navs(ent)

    # ================================================================================================================
    # dispatch
    # ================================================================================================================
    def dispatch(self, req: ApiRequest, caller: Caller, content_ids: dict[str, tuple[EntityDef, str]] | None = None
                 ) -> ApiResponse:
        try:
            return self._dispatch(req, caller, content_ids or {})
        except DataverseError as err:
            return ApiResponse.error(err)

    def _dispatch(self, req: ApiRequest, caller: Caller, refs: dict[str, tuple[EntityDef, str]]) -> ApiResponse:
        path = req.path.strip("/")
        method = req.method.upper()
        if path in ("", "$metadata"):
            if method != "GET":
                raise DataverseError.no_http_resource(f"{req.api_url}/{path}")
            return metadata.service_document(req) if path == "" else metadata.csdl_response(self.variant)
        segments = _split_path(path)
        first = segments[0]
        m = _SEGMENT.match(first)
        if not m:
            raise DataverseError.resource_not_found(first)
        name, key = m.group("name"), m.group("key")
        if name == "WhoAmI":
            if method != "GET" or (key not in (None, "")):
                raise DataverseError.no_http_resource(f"{req.api_url}/{path}")
            return self.who_am_i(req, caller)
        if name == "EntityDefinitions":
            if method != "GET":
                raise DataverseError.no_http_resource(f"{req.api_url}/{path}")
            return metadata.entity_definitions(req, key, segments[1:], self.variant)
        if name == "GetTrackingTokenEmail":
            if method != "POST":
                raise DataverseError.no_http_resource(f"{req.api_url}/{path}")
            return self.get_tracking_token(req, caller)
        if name.startswith("$") and name[1:].isdigit():
            if name not in refs:
                raise DataverseError.bad_request(f"Content-ID Reference: '{name}' does not exist in the batch context.")
            ent, rid = refs[name]
        else:
            ent_opt = entity_by_set(name)
            if ent_opt is None:
                raise DataverseError.resource_not_found(name)
            ent = ent_opt
            rid = None
            if key is not None:
                rid = self.resolve_key(ent, key)
        rest = segments[1:]
        if rid is None:
            if rest:
                action = rest[0]
                raise DataverseError.resource_not_found(action)
            if method == "GET":
                return self.query(req, ent)
            if method == "POST":
                return self.create(req, ent, caller, refs)
            raise DataverseError.no_http_resource(f"{req.api_url}/{path}")
        if rest:
            seg = rest[0]
            if seg == "Microsoft.Dynamics.CRM.SendEmail" and ent.logical_name == "email" and method == "POST":
                return self.send_email(req, rid, caller)
            if (seg.removesuffix("()") == "Microsoft.Dynamics.CRM.RetrieveUserPrivileges"
                    and ent.logical_name == "systemuser" and method == "GET"):
                return self.retrieve_user_privileges(req, rid)
            if seg == "SendEmail":
                raise DataverseError.bad_request("Request message has unresolved parameters.")
            if method == "GET":
                return self.get_property(req, ent, rid, rest)
            raise DataverseError.resource_not_found(seg)
        if method == "GET":
            return self.retrieve(req, ent, rid)
        if method == "PATCH":
            return self.update(req, ent, rid, caller, refs)
        if method == "DELETE":
            return self.delete(req, ent, rid)
        raise DataverseError(405, "", f"The requested resource does not support http method '{method}'.")

    # ================================================================================================================
    # keys and references
    # ================================================================================================================
    def resolve_key(self, ent: EntityDef, key: str, *, must_exist: bool = False) -> str:
        key = key.strip()
        if _GUID.match(key):
            return key.lower()
        # Alternate key: name='value'[,name2='value2']; Dataverse only allows defined keys. The emulator accepts any
        # column (there are no custom keys to define) and resolves to exactly one row or 404.
        pairs = _parse_alt_key(key)
        if pairs is None:
            raise DataverseError.bad_request(
                f"The key in the request URI is not valid for resource 'Microsoft.Dynamics.CRM.{ent.logical_name}'.")
        rows: list[Row] | None = None
        for k, v in pairs:
            col = ent.column_for_key(k)
            if col is None:
                raise DataverseError.bad_request(
                    "The key in the request URI is not valid for resource "
                    f"'Microsoft.Dynamics.CRM.{ent.logical_name}'.")
            found = self.store.find(ent, col.value_key, v)
            ids = {r[ent.primary_id] for r in found}
            rows = found if rows is None else [r for r in rows if r[ent.primary_id] in ids]
        if not rows:
            raise DataverseError.does_not_exist(ent.logical_name, key)
        return str(rows[0][ent.primary_id])

    def resolve_ref(self, ref: Any, refs: dict[str, tuple[EntityDef, str]]) -> tuple[EntityDef, str]:
        if not isinstance(ref, str) or not ref:
            raise DataverseError.bad_request("An @odata.bind value must be a URL of an entity.", code="0x80048d19")
        text = ref.strip()
        if text.startswith("$") and text[1:].isdigit():
            if text not in refs:
                raise DataverseError.bad_request(f"Content-ID Reference: '{text}' does not exist in the batch context.")
            return refs[text]
        if "://" in text:
            text = urlsplit(text).path
        if API_PATH in text:
            text = text.split(API_PATH, 1)[1]
        text = text.strip("/")
        m = _SEGMENT.match(text)
        if not m or m.group("key") is None:
            raise DataverseError.bad_request(f"The @odata.bind value '{ref}' is not a valid entity reference.",
                                             code="0x80048d19")
        ent = entity_by_set(m.group("name"))
        if ent is None:
            raise DataverseError.resource_not_found(m.group("name"))
        rid = self.resolve_key(ent, m.group("key"))
        return ent, rid

    # ================================================================================================================
    # payload application
    # ================================================================================================================
    def coerce(self, ent: EntityDef, col: Column, value: Any) -> Any:
        if value is None:
            if col.type == STATUS:
                raise DataverseError.bad_request(f"{ent.schema_name}.StatusCode attribute cannot be null")
            return None
        t = col.type

        def bad() -> DataverseError:
            return DataverseError.bad_request(
                f"Error identified in Payload provided by the user for Entity :'{ent.entity_set}'. Cannot convert the "
                f"literal '{value}' to the expected type '{_edm_name(col)}'.", code="0x80048d19")

        if t in (STRING, MEMO):
            if not isinstance(value, str):
                raise bad()
            if col.max_length is not None and len(value) > col.max_length:
                raise DataverseError.bad_request(
                    f"A validation error occurred.  The length of the '{col.name}' attribute of the "
                    f"'{ent.logical_name}' entity exceeded the maximum allowed length of '{col.max_length}'.",
                    code="0x80044331")
            return value
        if t in (INT, OPTIONSET, STATE, STATUS):
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad()
            if t == OPTIONSET and col.options and value not in col.options:
                raise DataverseError.bad_request(
                    f"A validation error occurred. The value {value} of '{col.name}' on record of type "
                    f"'{ent.logical_name}' is outside the valid range.", code="0x80044331")
            if (col.min_value is not None and value < col.min_value) or (
                    col.max_value is not None and value > col.max_value):
                raise DataverseError.bad_request(
                    f"A validation error occurred. The value {value} of '{col.name}' on record of type "
                    f"'{ent.logical_name}' is outside the valid range.", code="0x80044331")
            return value
        if t == BOOL:
            if not isinstance(value, bool):
                raise bad()
            return value
        if t in (DECIMAL, MONEY):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad()
            return value
        if t == DATETIME:
            from .odata import normalize_datetime

            if not isinstance(value, str):
                raise bad()
            try:
                return normalize_datetime(value)
            except DataverseError:
                raise bad() from None
        if t == GUID:
            if not isinstance(value, str) or not _GUID.match(value):
                raise bad()
            return value.lower()
        return value

    def apply_payload(self, ent: EntityDef, payload: Any, row: Row, refs: dict[str, tuple[EntityDef, str]], *,
                      creating: bool) -> dict[str, list[Any]]:
        """Validate ``payload`` and write it into ``row``; return collection-valued deep-insert items by nav."""
        if not isinstance(payload, dict):
            raise DataverseError.bad_request("The request body must be a JSON object.", code="0x80048d19")
        collections: dict[str, list[Any]] = {}
        for key, value in payload.items():
            if key.startswith("@odata.") or key.startswith("@"):
                continue
            if "@" in key:
                nav, _, annotation = key.partition("@")
                if annotation != "odata.bind":
                    continue  # other instance annotations are ignored, as by Dataverse
                declared = self.navs(ent).get(nav)
                if declared is None:
                    raise DataverseError.undeclared_nav(nav)
                col_name, allowed = declared.column, declared.targets
                col = ent.columns[col_name]
                if not col.writable(creating=creating) and not self.system_writes:
                    self._read_only(ent, col_name, creating=creating)
                    continue
                if value is None:
                    row[col.value_key] = None
                    row.pop(f"~{col_name}", None)
                    continue
                target, rid = self.resolve_ref(value, refs)
                if target.logical_name not in allowed:
                    raise DataverseError.bad_request(
                        f"Navigation property '{nav}' cannot reference a '{target.logical_name}' record.",
                        code="0x80048d19")
                if not self.store.exists(target, rid):
                    raise DataverseError.missing_bind_target(target.logical_name, self.options.missing_bind_status,
                                                             self.options.missing_bind_code)
                row[col.value_key] = rid
                row[f"~{col_name}"] = target.logical_name
                continue
            if key in ent.collections:
                if not isinstance(value, list):
                    raise DataverseError.bad_request(f"'{key}' must be a JSON array.", code="0x80048d19")
                collections[key] = value
                continue
            if key in self.navs(ent):
                raise DataverseError.bad_request(
                    f"Deep insert through the single-valued navigation property '{key}' is not supported by the "
                    "emulator; bind an existing record with @odata.bind.")
            col = ent.column_for_key(key)
            if col is None:
                raise DataverseError.unknown_property(key, ent.logical_name)
            if key == ent.primary_id:
                if not creating and value is not None and str(value).lower() != row.get(ent.primary_id):
                    raise DataverseError.bad_request("The primary key of a record cannot be changed.")
                continue
            if not col.writable(creating=creating) and not self.system_writes:
                self._read_only(ent, col.name, creating=creating)
                continue
            row[col.value_key] = self.coerce(ent, col, value)
        return collections

    def _read_only(self, ent: EntityDef, col: str, *, creating: bool) -> None:
        if self.options.strict:
            # Real Dataverse ignores a column that is not valid for the operation. Strict mode is a lint: it makes
            # the mistake visible instead of silently dropping the value (docs/dataverse-emulator.md).
            flag = "IsValidForCreate" if creating else "IsValidForUpdate"
            raise DataverseError.bad_request(
                f"The attribute '{col}' of entity '{ent.logical_name}' is not valid for "
                f"{'create' if creating else 'update'} ({flag} = false); Dataverse would ignore it, the emulator "
                "runs in strict mode.", code="0x80040203")

    # ================================================================================================================
    # create
    # ================================================================================================================
    def _body(self, req: ApiRequest) -> Any:
        if not req.body:
            return {}
        try:
            return json.loads(req.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataverseError.bad_request(f"The request body is not valid JSON: {exc}", code="0x80048d19") from None

    def create(self, req: ApiRequest, ent: EntityDef, caller: Caller, refs: dict[str, tuple[EntityDef, str]],
               rid: str | None = None) -> ApiResponse:
        if not ent.creatable:
            raise DataverseError(405, "0x80040800",
                                 f"The 'Create' method does not support entities of type '{ent.logical_name}'.")
        payload = self._body(req)
        prefer = parse_prefer(_header_list(req, "prefer"))
        with self.store.transaction():
            new_id = self.create_record(ent, payload, caller, refs, rid=rid)
        return self._write_response(req, ent, new_id, prefer, created=True)

    def _write_response(self, req: ApiRequest, ent: EntityDef, rid: str, prefer: Prefer, *, created: bool
                        ) -> ApiResponse:
        url = f"{req.api_url}/{ent.entity_set}({rid})"
        if prefer.return_representation:
            row = self.store.get(ent, rid)
            assert row is not None
            params = req.params
            select = parse_select(params.get("$select"))
            body = self.format_row(req, ent, row, select, prefer)
            ctx_sel = f"({','.join(select)})" if select else ""
            body = {"@odata.context": f"{req.api_url}/$metadata#{ent.entity_set}{ctx_sel}/$entity", **body}
            return ApiResponse.json(201 if created else 200, body, {"Preference-Applied": "return=representation",
                                                                     "ETag": etag(row)})
        return ApiResponse(204, {"OData-Version": "4.0", "OData-EntityId": url})

    def create_record(self, ent: EntityDef, payload: Any, caller: Caller, refs: dict[str, tuple[EntityDef, str]], *,
                      rid: str | None = None, parent: tuple[EntityDef, str, str] | None = None) -> str:
        row: Row = {}
        if isinstance(payload, dict) and payload.get(ent.primary_id) is not None:
            pk = payload[ent.primary_id]
            if not isinstance(pk, str) or not _GUID.match(pk):
                raise DataverseError.bad_request(
                    f"Cannot convert the literal '{pk}' to the expected type 'Edm.Guid'.", code="0x80048d19")
            if rid is not None and pk.lower() != rid:
                raise DataverseError.bad_request("The key in the URL and the primary key in the body differ.")
            rid = pk.lower()
        rid = rid or str(uuid.uuid4())
        row[ent.primary_id] = rid
        collections = self.apply_payload(ent, payload, row, refs, creating=True)
        parent_id = None
        if parent is not None:
            p_ent, p_id, fk = parent
            row[f"_{fk}_value"] = p_id
            row[f"~{fk}"] = p_ent.logical_name
            parent_id = p_id
        elif ent.logical_name == "activitymimeattachment" and row.get("_objectid_value"):
            parent_id = row["_objectid_value"]
        self._system_fields(ent, row, caller, creating=True)
        self._entity_rules(ent, row, caller, creating=True, parent_id=parent_id)
        try:
            self.store.insert(ent, rid, row, parent=parent_id)
        except sqlite3.IntegrityError:
            raise DataverseError.duplicate_key(self.options.duplicate_status) from None
        for nav_name, items in collections.items():
            nav = ent.collections[nav_name]
            child = ENTITIES[nav.target]
            for item in items:
                self.create_record(child, item, caller, refs, parent=(ent, rid, nav.fk))
        self._after_create(ent, rid, row, caller)
        return rid

    def _system_fields(self, ent: EntityDef, row: Row, caller: Caller, *, creating: bool) -> None:
        now = now_iso()
        if "modifiedon" in ent.columns:
            row["modifiedon"] = now
        if "modifiedby" in ent.columns:
            row["_modifiedby_value"], row["~modifiedby"] = caller.user_id, "systemuser"
            row["_modifiedonbehalfby_value"] = caller.app_user_id
            if caller.app_user_id:
                row["~modifiedonbehalfby"] = "systemuser"
        if not creating:
            return
        if "createdon" in ent.columns:
            row["createdon"] = row.get("overriddencreatedon") or now
        if "createdby" in ent.columns:
            row["_createdby_value"], row["~createdby"] = caller.user_id, "systemuser"
            row["_createdonbehalfby_value"] = caller.app_user_id
            if caller.app_user_id:
                row["~createdonbehalfby"] = "systemuser"
        if "ownerid" in ent.columns and ent.columns["ownerid"].valid_for_create:
            if not row.get("_ownerid_value"):
                row["_ownerid_value"], row["~ownerid"] = caller.user_id, "systemuser"
            self._set_owning(row)
        if ent.state_status and "statecode" in ent.columns:
            self._apply_state(ent, row, creating=True)

    def _set_owning(self, row: Row) -> None:
        owner, kind = row.get("_ownerid_value"), row.get("~ownerid", "systemuser")
        row["_owninguser_value"] = owner if kind == "systemuser" else None
        row["_owningteam_value"] = owner if kind == "team" else None
        if kind == "systemuser":
            row["~owninguser"] = "systemuser"
        else:
            row["~owningteam"] = "team"
        owner_ent = ENTITIES[kind]
        owner_row = self.store.get(owner_ent, owner) if owner else None
        bu = owner_row.get("_businessunitid_value") if owner_row else None
        row["_owningbusinessunit_value"] = bu
        if bu:
            row["~owningbusinessunit"] = "businessunit"

    def _apply_state(self, ent: EntityDef, row: Row, *, creating: bool) -> None:
        """Fill/validate the statecode/statuscode pair (dataverse.md §2.4: "always set the desired statuscode").

        A missing statuscode becomes the state's default status; callers that change only the statuscode infer
        the state first (see ``update_record``).
        """
        state, status = row.get("statecode"), row.get("statuscode")
        if creating and not self.options.allow_state_on_create and state not in (None, 0):
            raise DataverseError.bad_request("statecode cannot be set on create.")
        if state is None:
            state = 0
        if state not in ent.state_status:
            raise DataverseError.bad_request(
                f"{state} is not a valid state code on {ent.logical_name}.", code="0x80040203")
        if status is None:
            status = ent.state_status[state][0]
        if status not in ent.state_status[state][1]:
            raise DataverseError.bad_request(
                f"{status} is not a valid status code for state code {ent.schema_name}State."
                f"{ent.columns['statecode'].options.get(state, state)} on {ent.logical_name}.", code="0x80040203")
        row["statecode"], row["statuscode"] = state, status

    def _entity_rules(self, ent: EntityDef, row: Row, caller: Caller, *, creating: bool, parent_id: str | None) -> None:
        name = ent.logical_name
        if name in ("contact", "lead", "systemuser") and ("firstname" in row or "lastname" in row or creating):
            row["fullname"] = " ".join(p for p in (row.get("firstname"), row.get("lastname")) if p) or None
        if name == "email" and creating:
            row.setdefault("directioncode", True)
            row["activitytypecode"] = "email"
            row.setdefault("deliveryattempts", 0)
            row.setdefault("prioritycode", 1)
            row["attachmentcount"] = 0
        if name == "activityparty":
            self._party_rules(row)
        if name == "activitymimeattachment" and creating:
            self._attachment_rules(row, parent_id)
        if name == "queueitem" and creating:
            self._queue_item_rules(row)
        if name == "systemuser" and creating:
            row.setdefault("isdisabled", False)
            row.setdefault("incomingemaildeliverymethod", 2)
            row.setdefault("outgoingemaildeliverymethod", 2)
            row.setdefault("emailrouteraccessapproval", 0)
            row.setdefault("accessmode", 0)
        if name == "queue" and creating:
            row.setdefault("incomingemaildeliverymethod", 0)
            row.setdefault("outgoingemaildeliverymethod", 0)
            row.setdefault("incomingemailfilteringmethod", 0)
            row.setdefault("emailrouteraccessapproval", 0)
        if name == "mailbox" and creating:
            # isforwardmailbox is read-only with DefaultValue 1 (mailbox.md): a mailbox created over the Web API
            # (no regarding user/queue) is a forward mailbox; users' and queues' mailboxes are the platform's own.
            row.setdefault("isforwardmailbox", not row.get("_regardingobjectid_value"))
            for k, v in (("enabledforincomingemail", True), ("enabledforoutgoingemail", True), ("enabledforact", True),
                         ("incomingemailstatus", 0), ("outgoingemailstatus", 0), ("actstatus", 0),
                         ("mailboxstatus", 0), ("processanddeleteemails", False),
                         ("isemailaddressapprovedbyo365admin", False), ("emailrouteraccessapproval", 0),
                         ("incomingemaildeliverymethod", 0), ("outgoingemaildeliverymethod", 0),
                         ("actdeliverymethod", 2)):
                row.setdefault(k, v)

    def _queue_item_rules(self, row: Row) -> None:
        """What the platform fills on a new queue item (queueitem.md, of the columns the emulator carries): Entered
        Queue (enteredon); Title, which "is copied from the record that was assigned to the queue" (the record's
        primary name: an email's subject); for email, Sender and To copied from it; state Active. objectid and queueid
        are ApplicationRequired. A title the client sends is kept (which one wins is NOT VERIFIED)."""
        object_id, object_type = row.get("_objectid_value"), row.get("~objectid")
        if not object_id or not row.get("_queueid_value"):
            raise DataverseError.bad_request("A queue item needs objectid and queueid.", code="0x80040203")
        object_ent = ENTITIES.get(object_type or "")
        target = self.store.get(object_ent, object_id) if object_ent is not None else None
        if target is not None and not row.get("title") and object_ent is not None:
            title_limit = ENTITIES["queueitem"].columns["title"].max_length
            row["title"] = (target.get(object_ent.primary_name) or "")[:title_limit] or None
        if target is not None and object_type == "email":
            row["sender"] = (target.get("sender") or "")[:250] or None
            row["torecipients"] = (target.get("torecipients") or "")[:500] or None
        row["enteredon"] = now_iso()
        row.setdefault("statecode", 0)
        row.setdefault("statuscode", 1)

    def _party_rules(self, row: Row) -> None:
        mask = row.get("participationtypemask")
        if mask is None:
            raise DataverseError.bad_request("participationtypemask is required for an activity party.",
                                             code="0x80040203")
        if mask not in self.options.email_party_masks:
            raise DataverseError.bad_request(
                f"participationtypemask {mask} is not valid for an email activity party; use 1 (Sender), 2 (To), "
                "3 (Cc) or 4 (Bcc). Regarding (8) and Owner (9) parties are maintained by the platform.",
                code="0x80040203")
        party, kind = row.get("_partyid_value"), row.get("~partyid")
        if not party and not row.get("addressused"):
            raise DataverseError.bad_request("An activity party needs a partyid or an addressused.",
                                             code="0x80040203")
        row.setdefault("ispartydeleted", False)
        row.setdefault("instancetypecode", 0)
        if party and kind in EMAIL_COLUMN:
            target = self.store.get(ENTITIES[kind], party)
            if target is not None:
                if not row.get("addressused"):
                    # Resolved parties carry the record's primary address (Dataverse fills addressused).
                    row["addressused"] = target.get(EMAIL_COLUMN[kind])
                    row["addressusedemailcolumnnumber"] = 1 if kind != "systemuser" else None
                row["donotemail"] = bool(target.get("donotemail", False))

    def _attachment_rules(self, row: Row, parent_id: str | None) -> None:
        if not parent_id:
            raise DataverseError.bad_request("objectid is required for an activitymimeattachment.",
                                             code="0x80040203")
        email = self.store.get(ENTITIES["email"], parent_id)
        if email is None:
            raise DataverseError.does_not_exist("email", parent_id)
        if email.get("statecode") != 0:
            raise DataverseError.bad_request(
                "Completed and canceled email is read-only: attachments can't be added to it.", code="0x80040203")
        row["_objectid_value"], row["~objectid"] = parent_id, "email"
        row["_activityid_value"], row["~activityid"] = parent_id, "email"
        row.setdefault("objecttypecode", "email")
        body = row.get("body")
        if body is not None:
            org = self.organization()
            limit = int(org.get("maxuploadfilesize") or 5242880)
            if len(body) > limit:
                # §3: the limit applies to the base64 size.
                raise DataverseError.attachment_too_big()
            try:
                row["filesize"] = len(base64.b64decode(body, validate=True))
            except (binascii.Error, ValueError):
                raise DataverseError.bad_request("The attachment body must be base64.", code="0x80040203") from None
        else:
            row["filesize"] = 0
        siblings = self.store.children(ENTITIES["activitymimeattachment"], parent_id)
        row.setdefault("attachmentnumber", len(siblings) + 1)
        row["isfollowed"] = False

    def _after_create(self, ent: EntityDef, rid: str, row: Row, caller: Caller) -> None:
        name = ent.logical_name
        if name == "email":
            self._derive_email_fields(rid)
        elif name == "activitymimeattachment" and row.get("_objectid_value"):
            self._refresh_attachment_count(row["_objectid_value"])
        elif name in ("systemuser", "queue"):
            self._provision_mailbox(ent, rid, row, caller)

    def _derive_email_fields(self, rid: str) -> None:
        email_ent = ENTITIES["email"]
        email = self.store.get(email_ent, rid)
        if email is None:
            return
        parties = self.store.children(ENTITIES["activityparty"], rid)
        senders = [p for p in parties if p.get("participationtypemask") == 1]
        if len(senders) > 1:
            raise DataverseError.bad_request("An email can have only one sender (participationtypemask 1).",
                                             code="0x80040203")
        changed = False
        if senders:
            s = senders[0]
            kind, pid = s.get("~partyid"), s.get("_partyid_value")
            if pid and kind:
                email["_emailsender_value"], email["~emailsender"] = pid, kind
                if kind in ("systemuser", "queue"):
                    owner_row = self.store.get(ENTITIES[kind], pid)
                    mbx = owner_row.get("_defaultmailbox_value") if owner_row else None
                    if mbx:
                        email["_sendermailboxid_value"], email["~sendermailboxid"] = mbx, "mailbox"
                changed = True
            if not email.get("sender") and s.get("addressused"):
                email["sender"] = s["addressused"][:250]
                changed = True
        to = [p.get("addressused") for p in parties if p.get("participationtypemask") == 2 and p.get("addressused")]
        if to and not email.get("torecipients"):
            email["torecipients"] = ";".join(to)[:500]
            changed = True
        email["attachmentcount"] = len(self.store.children(ENTITIES["activitymimeattachment"], rid))
        if changed or email["attachmentcount"]:
            self.store.replace(email_ent, rid, email)

    def _refresh_attachment_count(self, email_id: str) -> None:
        ent = ENTITIES["email"]
        email = self.store.get(ent, email_id)
        if email is not None:
            email["attachmentcount"] = len(self.store.children(ENTITIES["activitymimeattachment"], email_id))
            self.store.replace(ent, email_id, email)

    def _provision_mailbox(self, ent: EntityDef, rid: str, row: Row, caller: Caller) -> None:
        """Creating a user or queue creates its mailbox (and a user's usersettings), as Dataverse does."""
        mbx_ent = ENTITIES["mailbox"]
        address = row.get("internalemailaddress") if ent.logical_name == "systemuser" else row.get("emailaddress")
        mbx_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailbox/{rid}"))
        mbx: Row = {
            "mailboxid": mbx_id, "name": row.get("fullname") or row.get("name") or address, "emailaddress": address,
            "_regardingobjectid_value": rid, "~regardingobjectid": ent.logical_name,
            "_ownerid_value": rid if ent.logical_name == "systemuser" else row.get("_ownerid_value"),
            "~ownerid": "systemuser",
        }
        for col in _SYNCED_METHOD_COLUMNS:
            mbx[col] = row.get(col)
        if ent.logical_name == "systemuser" and row.get("isemailaddressapprovedbyo365admin") is not None:
            mbx["isemailaddressapprovedbyo365admin"] = row["isemailaddressapprovedbyo365admin"]
        system = Caller(user_id=caller.user_id, app_user_id=caller.app_user_id)
        self._system_fields(mbx_ent, mbx, system, creating=True)
        self._entity_rules(mbx_ent, mbx, system, creating=True, parent_id=None)
        if not self.store.exists(mbx_ent, mbx_id):
            self.store.insert(mbx_ent, mbx_id, mbx, parent=rid)
        fresh = self.store.get(ent, rid)
        assert fresh is not None
        fresh["_defaultmailbox_value"], fresh["~defaultmailbox"] = mbx_id, "mailbox"
        self.store.replace(ent, rid, fresh)
        if ent.logical_name == "systemuser":
            us_ent = ENTITIES["usersettings"]
            if not self.store.exists(us_ent, rid):
                now = now_iso()
                # DefaultFormValue 2 per the usersettings reference (a support blog says 1; always read it).
                # businessunitid is a plain Uniqueidentifier on usersettings (usersettings.md), not a lookup.
                us: Row = {"systemuserid": rid, "incomingemailfilteringmethod": 2, "timezonecode": 85,
                           "uilanguageid": 1033, "localeid": 1033, "createdon": now,
                           "businessunitid": row.get("_businessunitid_value")}
                self.store.insert(us_ent, rid, us)

    # ================================================================================================================
    # update / upsert / delete
    # ================================================================================================================
    def update(self, req: ApiRequest, ent: EntityDef, rid: str, caller: Caller,
               refs: dict[str, tuple[EntityDef, str]]) -> ApiResponse:
        payload = self._body(req)
        prefer = parse_prefer(_header_list(req, "prefer"))
        if_match = req.header("if-match")
        if_none = req.header("if-none-match")
        with self.store.transaction():
            before = self.store.get(ent, rid)
            if before is None:
                if if_match is not None:
                    # §6: If-Match on a missing record -> 404 with an empty code.
                    raise DataverseError.does_not_exist(ent.logical_name, rid, code="")
                if not ent.creatable:
                    raise DataverseError.does_not_exist(ent.logical_name, rid)
                new_id = self.create_record(ent, payload, caller, refs, rid=rid)
                return self._write_response(req, ent, new_id, prefer, created=True)
            if if_none is not None and if_none.strip() == "*":
                raise DataverseError.already_exists()
            if if_match is not None and if_match.strip() != "*":
                if ent.logical_name in self.variant.concurrency_off:
                    raise DataverseError.concurrency_not_enabled(ent.logical_name)
                if if_match.strip() != etag(before):
                    raise DataverseError.version_mismatch()
            self.update_record(ent, rid, before, payload, caller, refs)
        return self._write_response(req, ent, rid, prefer, created=False)

    def update_record(self, ent: EntityDef, rid: str, before: Row, payload: Any, caller: Caller,
                      refs: dict[str, tuple[EntityDef, str]]) -> None:
        row = dict(before)
        if "statecode" in row and ent.state_status and isinstance(payload, dict):
            # Let _apply_state infer the missing half of a state/status change.
            if "statecode" in payload and "statuscode" not in payload:
                row.pop("statuscode", None)
        collections = self.apply_payload(ent, payload, row, refs, creating=False)
        if collections:
            raise DataverseError.bad_request("Deep update of collection-valued navigation properties is not supported.",
                                             code="0x80048d19")
        if ent.readonly_states and before.get("statecode") in ent.readonly_states:
            changed = {k for k in payload if not k.startswith("@") and k not in ("statecode", "statuscode")
                       and (k.endswith("@odata.bind") or row.get(k) != before.get(k))}
            if changed:
                state_label = ent.columns["statecode"].options.get(before["statecode"], before["statecode"])
                raise DataverseError.bad_request(
                    f"This {ent.logical_name} is {state_label} and read-only; only statecode/statuscode can change "
                    f"(attempted: {', '.join(sorted(changed))}).", code="0x80040203")
        if ent.state_status and ("statecode" in payload or "statuscode" in payload):
            if "statecode" not in payload:
                # statuscode alone: infer the state it belongs to.
                for st, (_d, allowed) in ent.state_status.items():
                    if row.get("statuscode") in allowed:
                        row["statecode"] = st
                        break
            # senton is read-only (email.md) and a PATCH to Sent does not fill it: only the platform's send path
            # (SendEmail / the mail server) stamps it -- see send_email().
            self._apply_state(ent, row, creating=False)
            if (ent.logical_name == "email" and row.get("statuscode") == 3 and before.get("statuscode") != 3
                    and self.options.senton_on_sent_status):
                row.setdefault("senton", None)
                row["senton"] = row["senton"] or now_iso()
        if ent.logical_name in ("contact", "lead", "systemuser"):
            self._entity_rules(ent, row, caller, creating=False, parent_id=None)
        if "_ownerid_value" in row and row.get("_ownerid_value") != before.get("_ownerid_value"):
            self._set_owning(row)
        self._system_fields(ent, row, caller, creating=False)
        self.store.replace(ent, rid, row)
        self._sync_methods(ent, rid, row, before)

    def _sync_methods(self, ent: EntityDef, rid: str, row: Row, before: Row) -> None:
        """Keep user/queue delivery-method columns and their mailbox in step (CRM syncs them both ways)."""
        changed = {c: row.get(c) for c in _SYNCED_METHOD_COLUMNS if row.get(c) != before.get(c) and c in ent.columns}
        if not changed:
            return
        if ent.logical_name in ("systemuser", "queue") and row.get("_defaultmailbox_value"):
            other_ent, other_id = ENTITIES["mailbox"], row["_defaultmailbox_value"]
        elif ent.logical_name == "mailbox" and row.get("~regardingobjectid") in ("systemuser", "queue"):
            other_ent, other_id = ENTITIES[row["~regardingobjectid"]], row["_regardingobjectid_value"]
        else:
            return
        other = self.store.get(other_ent, other_id)
        if other is None:
            return
        for col, val in changed.items():
            if col in other_ent.columns:
                other[col] = val
        other["modifiedon"] = now_iso()
        self.store.replace(other_ent, other_id, other)

    def delete(self, req: ApiRequest, ent: EntityDef, rid: str) -> ApiResponse:
        if ent.logical_name in ("organization", "usersettings", "activityparty"):
            raise DataverseError(405, "0x80040800",
                                 f"The 'Delete' method does not support entities of type '{ent.logical_name}'.")
        with self.store.transaction():
            row = self.store.get(ent, rid)
            if row is None:
                raise DataverseError.does_not_exist(ent.logical_name, rid)
            if_match = req.header("if-match")
            if if_match and if_match.strip() != "*" and ent.logical_name in self.variant.concurrency_off:
                raise DataverseError.concurrency_not_enabled(ent.logical_name)
            if if_match and if_match.strip() not in ("*", etag(row)):
                raise DataverseError.version_mismatch()
            self.store.delete(ent, rid)
            for nav in ent.collections.values():
                self.store.delete_children(ENTITIES[nav.target], rid)  # deleting an email cascades (§11)
            if ent.logical_name == "activitymimeattachment" and row.get("_objectid_value"):
                self._refresh_attachment_count(row["_objectid_value"])
        return ApiResponse(204, {"OData-Version": "4.0"})

    # ================================================================================================================
    # read
    # ================================================================================================================
    def retrieve(self, req: ApiRequest, ent: EntityDef, rid: str) -> ApiResponse:
        row = self.store.get(ent, rid)
        if row is None:
            raise DataverseError.does_not_exist(ent.logical_name, rid)
        params = req.params
        prefer = parse_prefer(_header_list(req, "prefer"))
        select = parse_select(params.get("$select"))
        expand = parse_expand(params.get("$expand"))
        inm = req.header("if-none-match")
        if inm and inm.strip() == etag(row) and not expand and not prefer.annotations:
            return ApiResponse(304, {"OData-Version": "4.0", "ETag": etag(row)})
        body = self.format_row(req, ent, row, select, prefer, expand)
        ctx_sel = f"({','.join(select)})" if select else ""
        body = {"@odata.context": f"{req.api_url}/$metadata#{ent.entity_set}{ctx_sel}/$entity", **body}
        return ApiResponse.json(200, body, {"ETag": etag(row), **_pref_applied(prefer)})

    def get_property(self, req: ApiRequest, ent: EntityDef, rid: str, rest: list[str]) -> ApiResponse:
        row = self.store.get(ent, rid)
        if row is None:
            raise DataverseError.does_not_exist(ent.logical_name, rid)
        prop = rest[0]
        if prop in ent.collections:
            nav = ent.collections[prop]
            child = ENTITIES[nav.target]
            prefer = parse_prefer(_header_list(req, "prefer"))
            rows = self.store.children(child, rid)
            select = parse_select(req.params.get("$select"))
            return ApiResponse.json(200, {
                "@odata.context": f"{req.api_url}/$metadata#{child.entity_set}",
                "value": [self.format_row(req, child, r, select, prefer) for r in rows]})
        col = ent.column_for_key(prop)
        if col is None:
            raise DataverseError.resource_not_found(prop)
        value = row.get(col.value_key)
        if len(rest) > 1 and rest[1] == "$value":
            if value is None:
                return ApiResponse(204, {"OData-Version": "4.0"})
            return ApiResponse(200, {"Content-Type": "text/plain", "OData-Version": "4.0"}, str(value).encode())
        return ApiResponse.json(200, {"@odata.context": f"{req.api_url}/$metadata#{ent.entity_set}({rid})/{prop}",
                                      "value": value})

    def query(self, req: ApiRequest, ent: EntityDef) -> ApiResponse:
        params = req.params
        prefer = parse_prefer(_header_list(req, "prefer"))
        if "$skip" in params:
            raise DataverseError.bad_request("The query parameter $skip is not supported", code="0x80060888")
        select = parse_select(params.get("$select"))
        expand = parse_expand(params.get("$expand"))
        where = parse_filter(params["$filter"]) if params.get("$filter") else None
        order = parse_orderby(params.get("$orderby"))
        top: int | None = None
        if params.get("$top"):
            try:
                top = int(params["$top"])
            except ValueError:
                raise DataverseError.syntax(f"Invalid value '{params['$top']}' for $top query option.") from None
            if top < 0:
                raise DataverseError.syntax("Invalid value for $top query option.")
        page = prefer.maxpagesize
        if page is not None:
            if page < 1 or page > 5000:
                raise DataverseError.bad_request("odata.maxpagesize must be between 1 and 5000.")
            limit: int | None = page  # §4.1: with maxpagesize, $top is ignored
        else:
            limit = top if top is not None else 5000
        count = params.get("$count", "").lower() == "true"
        result = run_query(self.store, ent, where=where, order=order, limit=limit,
                           skiptoken=params.get("$skiptoken"), count=count)
        if top is not None and page is None:
            result.next_token = None  # $top caps the result: no further pages
        ctx_sel = f"({','.join(select)})" if select else ""
        body: dict[str, Any] = {"@odata.context": f"{req.api_url}/$metadata#{ent.entity_set}{ctx_sel}"}
        if result.count is not None:
            body["@odata.count"] = result.count
        body["value"] = [self.format_row(req, ent, r, select, prefer, expand) for r in result.rows]
        if result.next_token:
            kept = [(k, v) for k, v in parse_qsl(req.query, keep_blank_values=True) if k != "$skiptoken"]
            from urllib.parse import urlencode

            qs = urlencode([*kept, ("$skiptoken", result.next_token)])
            body["@odata.nextLink"] = f"{req.api_url}/{ent.entity_set}?{qs}"
        return ApiResponse.json(200, body, _pref_applied(prefer))

    # ---- formatting ----------------------------------------------------------------------------------------------
    def format_row(self, req: ApiRequest, ent: EntityDef, row: Row, select: list[str] | None, prefer: Prefer,
                   expand: list[ExpandItem] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"@odata.etag": etag(row)}
        if select is None:
            keys = [c.value_key for c in ent.columns.values()]
        else:
            keys = []
            for s in select:
                col = ent.columns.get(s) if s in ent.columns else ent.column_for_key(s)
                if col is None:
                    raise DataverseError.unknown_property(s, ent.logical_name)
                keys.append(col.value_key)
            if ent.primary_id not in keys:
                keys.append(ent.primary_id)
        patterns = prefer.annotations
        for key in keys:
            value = row.get(key)
            out[key] = value
            if patterns and value is not None:
                col = ent.column_for_key(key)
                if col is not None:
                    self._annotate(out, ent, col, key, value, row, patterns)
        for item in expand or []:
            out[item.nav] = self._expand(req, ent, row, item, prefer)
        return out

    def _annotate(self, out: dict[str, Any], ent: EntityDef, col: Column, key: str, value: Any, row: Row,
                  patterns: tuple[str, ...]) -> None:
        def want(name: str) -> bool:
            return any(fnmatch.fnmatchcase(name, p) for p in patterns)

        fv = "OData.Community.Display.V1.FormattedValue"
        formatted: str | None = None
        if col.type in (OPTIONSET, STATE, STATUS) and col.options:
            formatted = col.options.get(value)
        elif col.type == BOOL:
            formatted = ("Outgoing" if value else "Incoming") if col.name == "directioncode" else (
                "Yes" if value else "No")
        elif col.type == DATETIME:
            d = dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
            half = "AM" if d.hour < 12 else "PM"
            formatted = f"{d.month}/{d.day}/{d.year} {(d.hour % 12) or 12}:{d.minute:02d} {half}"
        elif col.type in (INT, DECIMAL, MONEY) and not isinstance(value, bool):
            formatted = f"{value:,}"
        elif col.type == LOOKUP:
            kind = row.get(f"~{col.name}")
            if kind:
                if want("Microsoft.Dynamics.CRM.lookuplogicalname"):
                    out[f"{key}@Microsoft.Dynamics.CRM.lookuplogicalname"] = kind
                if want("Microsoft.Dynamics.CRM.associatednavigationproperty"):
                    # The declared single-valued navigation property for this column and target (what a client
                    # binds to write the same lookup), e.g. regardingobjectid_contact_email.
                    nav = self._associated_nav(ent, col.name, kind)
                    if nav is not None:
                        out[f"{key}@Microsoft.Dynamics.CRM.associatednavigationproperty"] = nav
                target_ent = ENTITIES.get(kind)
                if target_ent is not None and want(fv):
                    target = self.store.get(target_ent, value)
                    if target is not None:
                        formatted = target.get(target_ent.primary_name)
        if formatted is not None and want(fv):
            out[f"{key}@{fv}"] = formatted

    def _associated_nav(self, ent: EntityDef, column: str, target: str) -> str | None:
        for nav in self.navs(ent).values():
            if nav.column == column and target in nav.targets:
                return nav.name
        return None

    def _expand(self, req: ApiRequest, ent: EntityDef, row: Row, item: ExpandItem, prefer: Prefer) -> Any:
        if item.nav.endswith("/$ref"):
            raise DataverseError.bad_request("Expand with $ref is only supported on lookup type navigation property.",
                                             code="0x80060888")
        select = parse_select(item.options.get("$select"))
        if item.nav in ent.collections:
            nav = ent.collections[item.nav]
            child = ENTITIES[nav.target]
            where = parse_filter(item.options["$filter"]) if item.options.get("$filter") else None
            order = parse_orderby(item.options.get("$orderby"))
            top = int(item.options["$top"]) if item.options.get("$top") else None
            res = run_query(self.store, child, where=where, order=order, limit=top, parent=row[ent.primary_id])
            return [self.format_row(req, child, r, select, prefer) for r in res.rows]
        declared = self.navs(ent).get(item.nav)
        if declared is not None:
            col_name, allowed = declared.column, declared.targets
            kind, target_id = row.get(f"~{col_name}"), row.get(f"_{col_name}_value")
            if not target_id or kind not in allowed:
                return None
            target_ent = ENTITIES[kind]
            target = self.store.get(target_ent, target_id)
            return None if target is None else self.format_row(req, target_ent, target, select, prefer)
        raise DataverseError.unknown_property(item.nav, ent.logical_name)

    # ================================================================================================================
    # functions and actions
    # ================================================================================================================
    def organization(self) -> Row:
        rows = self.store.all(ENTITIES["organization"])
        if not rows:
            raise DataverseError(500, "", "The emulator has no organization row; seed one.")
        return rows[0]

    def who_am_i(self, req: ApiRequest, caller: Caller) -> ApiResponse:
        user = self.store.get(ENTITIES["systemuser"], caller.user_id) or {}
        org = self.organization()
        return ApiResponse.json(200, {
            "@odata.context": f"{req.api_url}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
            "BusinessUnitId": user.get("_businessunitid_value"), "UserId": caller.user_id,
            "OrganizationId": org["organizationid"]})

    def next_tracking_token(self, user_id: str) -> str:
        """Prefix + online digit (0) + user number (trackingtokeniddigits) + per-user counter, wrapping to 0.

        crm-email-behaviour.md §6.2: "4 character prefix and a 7-digit identifier" by default (CRM:0 001 001).
        The counters live where the reference puts them (audit dataverse-fidelity §2): the user's number in
        ``usersettings.trackingtokenid``, the next counter value in ``usersettings.nexttrackingnumber``, and the
        counter recycles after ``organization.maximumtrackingnumber`` (its width is the counter's digit count).
        """
        org = self.organization()
        org_ent, settings_ent = ENTITIES["organization"], ENTITIES["usersettings"]
        prefix = str(org.get("trackingprefix") or "CRM:").split(";")[0]
        digits = int(org.get("trackingtokeniddigits") or 3)
        maximum = int(org.get("maximumtrackingnumber") or (10 ** self.options.tracking_counter_digits - 1))
        counter_digits = len(str(maximum))
        if self.store.get(ENTITIES["systemuser"], user_id) is None:
            raise DataverseError.does_not_exist("systemuser", user_id)
        settings = self.store.get(settings_ent, user_id)
        if settings is None:
            raise DataverseError.does_not_exist("usersettings", user_id)
        number = settings.get("trackingtokenid")
        if number is None:
            ordinal = int(org.get("~nextuserordinal") or 1)
            org["~nextuserordinal"] = ordinal + 1
            number = int(org.get("trackingtokenidbase") or 0) + ordinal
            settings["trackingtokenid"] = number
            self.store.replace(org_ent, org["organizationid"], org)
        counter = int(settings.get("nexttrackingnumber") or 1)
        settings["nexttrackingnumber"] = counter % maximum + 1
        self.store.replace(settings_ent, user_id, settings)
        return f"{prefix}0{int(number):0{digits}d}{counter % (maximum + 1):0{counter_digits}d}"

    def get_tracking_token(self, req: ApiRequest, caller: Caller) -> ApiResponse:
        body = self._body(req)
        if not isinstance(body, dict):
            raise DataverseError.bad_request("The request body must be a JSON object.", code="0x80048d19")
        with self.store.transaction():
            token = self.next_tracking_token(caller.user_id)
        return ApiResponse.json(200, {
            "@odata.context": f"{req.api_url}/$metadata#Microsoft.Dynamics.CRM.GetTrackingTokenEmailResponse",
            "TrackingToken": token})

    def retrieve_user_privileges(self, req: ApiRequest, rid: str) -> ApiResponse:
        """``systemusers(<id>)/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()``: the user's privileges through roles
        (and teams) as RolePrivilege {Depth, PrivilegeId, BusinessUnitId, PrivilegeName}. The emulator has no roles:
        a seeded user's ``privileges`` (names, or {"name", "depth"}) are what it holds; depth defaults to Global."""
        user = self.store.get(ENTITIES["systemuser"], rid)
        if user is None:
            raise DataverseError.does_not_exist("systemuser", rid)
        granted = []
        for entry in user.get("~privileges") or []:
            name, depth = (entry, "Global") if isinstance(entry, str) else (entry.get("name"), entry.get("depth"))
            if not name:
                continue
            granted.append({"Depth": depth or "Global", "PrivilegeName": name,
                            "PrivilegeId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-emulator/privilege/{name}")),
                            "BusinessUnitId": user.get("_businessunitid_value")})
        return ApiResponse.json(200, {
            "@odata.context": f"{req.api_url}/$metadata#Microsoft.Dynamics.CRM.RetrieveUserPrivilegesResponse",
            "RolePrivileges": granted})

    def send_email(self, req: ApiRequest, rid: str, caller: Caller) -> ApiResponse:
        body = self._body(req)
        if not isinstance(body, dict) or not isinstance(body.get("IssueSend"), bool):
            raise DataverseError.bad_request("Request message has unresolved parameters: 'IssueSend' is required.")
        issue_send: bool = body["IssueSend"]
        token_param = body.get("TrackingToken")
        ent = ENTITIES["email"]
        with self.store.transaction():
            email = self.store.get(ent, rid)
            if email is None:
                raise DataverseError.does_not_exist("email", rid)
            if email.get("statecode") != 0:
                raise DataverseError.bad_request(
                    "The email cannot be sent because it is not open (it was already sent, received or canceled).",
                    code="0x80040203")
            parties = self.store.children(ENTITIES["activityparty"], rid)
            senders = [p for p in parties if p.get("participationtypemask") == 1]
            recipients = [p for p in parties if p.get("participationtypemask") in (2, 3, 4)]
            if not recipients:
                raise DataverseError.bad_request("The e-mail must have at least one recipient before it can be sent.",
                                                 code="0x80040203")
            org = self.organization()
            unresolved = [p.get("addressused") for p in recipients if not p.get("_partyid_value")]
            if issue_send and unresolved and not org.get("allowunresolvedpartiesonemailsend"):
                raise DataverseError.bad_request(
                    "The e-mail cannot be sent: it has unresolved recipients and the organization setting "
                    "allowunresolvedpartiesonemailsend is off.", code="0x80040203")
            sender_kind = senders[0].get("~partyid") if senders else None
            sender_id = senders[0].get("_partyid_value") if senders else None
            outcome = "sent"
            if issue_send:
                method = 0
                if sender_kind in ("systemuser", "queue") and sender_id:
                    srow = self.store.get(ENTITIES[sender_kind], sender_id)
                    method = int((srow or {}).get("outgoingemaildeliverymethod") or 0)
                elif not senders:
                    raise DataverseError.bad_request("The e-mail must have a sender before it can be sent.",
                                                     code="0x80040203")
                outcome = self.options.sendemail_outcome.get(method, "error")
                if outcome == "error":
                    raise DataverseError.bad_request(
                        "The e-mail cannot be sent because the sender's outgoing email delivery method is "
                        f"{method} ({'None' if method == 0 else 'not supported'}).", code="0x80040203")
            token = token_param if isinstance(token_param, str) and token_param else None
            if token is None:
                # null -> generated (documented); "" treated the same (NOT VERIFIED, see docs).
                token_owner = sender_id if sender_kind == "systemuser" and sender_id else caller.user_id
                if sender_kind == "queue" and sender_id:
                    qrow = self.store.get(ENTITIES["queue"], sender_id) or {}
                    token_owner = qrow.get("_ownerid_value") or caller.user_id  # queues use the owner's counter
                token = self.next_tracking_token(token_owner)
            subject = email.get("subject") or ""
            if token not in subject:
                subject = f"{subject} {token}".strip()
            email = self.store.get(ent, rid) or email
            email["subject"] = subject[:800]
            email["trackingtoken"] = token
            email["statecode"] = 1
            if outcome == "pending":
                email["statuscode"] = 6
            else:
                email["statuscode"] = 3
                email["senton"] = now_iso()
                email["actualend"] = email.get("actualend") or now_iso()
            self._system_fields(ent, email, caller, creating=False)
            self.store.replace(ent, rid, email)
        return ApiResponse.json(200, {
            "@odata.context": f"{req.api_url}/$metadata#Microsoft.Dynamics.CRM.SendEmailResponse",
            "Subject": email["subject"]})


# ---- helpers ------------------------------------------------------------------------------------------------------
def _header_list(req: ApiRequest, name: str) -> list[str]:
    v = req.header(name)
    return [v] if v else []


def _pref_applied(prefer: Prefer) -> dict[str, str]:
    applied = []
    if prefer.annotations:
        applied.append(f'odata.include-annotations="{",".join(prefer.annotations)}"')
    if prefer.maxpagesize:
        applied.append(f"odata.maxpagesize={prefer.maxpagesize}")
    return {"Preference-Applied": ",".join(applied)} if applied else {}


def _edm_name(col: Column) -> str:
    from .schema import EDM_TYPES

    return EDM_TYPES.get(col.type, "Edm.String")


def _split_path(path: str) -> list[str]:
    """Split on '/' outside parentheses/quotes (alternate keys may contain '/')."""
    out, buf, depth, quoted = [], [], 0, False
    for ch in path:
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        if ch == "/" and depth == 0 and not quoted:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf))
    return [s for s in out if s]


def _parse_alt_key(key: str) -> list[tuple[str, Any]] | None:
    pairs: list[tuple[str, Any]] = []
    pattern = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*('(?:[^']|'')*'|[^,]+)\s*(?:,|$)")
    pos = 0
    while pos < len(key):
        m = pattern.match(key, pos)
        if not m:
            return None
        raw = m.group(2).strip()
        value: Any
        if raw.startswith("'"):
            value = raw[1:-1].replace("''", "'")
        elif _GUID.match(raw):
            value = raw.lower()
        else:
            try:
                value = int(raw)
            except ValueError:
                return None
        pairs.append((m.group(1), value))
        pos = m.end()
    return pairs or None
