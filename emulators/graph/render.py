"""Graph JSON for stored messages and attachments ($select, $expand, Prefer body type)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping
from typing import Any

from .odata import lookup
from .store import MessageRow, Store
from .util import GraphError

__all__ = [
    "DEFAULT_PROPS",
    "body_preview",
    "normalise_select",
    "render_attachment",
    "render_message",
]

# Properties returned without $select, in Graph's order; SELECT_ONLY ones need an explicit $select.
DEFAULT_PROPS: tuple[str, ...] = (
    "createdDateTime", "lastModifiedDateTime", "changeKey", "categories", "receivedDateTime", "sentDateTime",
    "hasAttachments", "internetMessageId", "subject", "bodyPreview", "importance", "parentFolderId",
    "conversationId", "conversationIndex", "isDeliveryReceiptRequested", "isReadReceiptRequested", "isRead",
    "isDraft", "webLink", "inferenceClassification", "body", "sender", "from", "toRecipients", "ccRecipients",
    "bccRecipients", "replyTo", "flag",
)
SELECT_ONLY: tuple[str, ...] = ("internetMessageHeaders", "uniqueBody")
_ALL = {p.lower(): p for p in ("id", *DEFAULT_PROPS, *SELECT_ONLY)}
_DEFAULTS: dict[str, Any] = {
    "categories": [], "hasAttachments": False, "internetMessageId": None, "subject": "", "bodyPreview": "",
    "importance": "normal", "conversationId": None, "conversationIndex": None, "isDeliveryReceiptRequested": False,
    "isReadReceiptRequested": False, "isRead": False, "isDraft": False, "inferenceClassification": "focused",
    "body": {"contentType": "text", "content": ""}, "sender": None, "from": None, "toRecipients": [],
    "ccRecipients": [], "bccRecipients": [], "replyTo": [], "flag": {"flagStatus": "notFlagged"},
    "sentDateTime": None, "receivedDateTime": None,
}
# MAPI named properties Graph exposes as singleValueExtendedProperties (graph.md §6)
_EXTENDED = {"string 0x1042": "_inReplyTo", "string 0x1039": "_references", "string 0x1035": "internetMessageId"}

_TAGS = re.compile(r"<(script|style)[^>]*>.*?</\1>|<[^>]+>", re.S | re.I)
_SPACE = re.compile(r"\s+")


def html_to_text(content: str) -> str:
    text = re.sub(r"<br\s*/?>|</p>|</div>", "\n", content, flags=re.I)
    return html.unescape(_TAGS.sub("", text)).strip()


def body_preview(body: Mapping[str, Any] | None) -> str:
    if not body:
        return ""
    content = str(body.get("content") or "")
    if str(body.get("contentType", "")).lower() == "html":
        content = html_to_text(content)
    return _SPACE.sub(" ", content).strip()[:255]


def convert_body(body: Mapping[str, Any] | None, wanted: str | None) -> dict[str, Any] | None:
    """Prefer: outlook.body-content-type — Exchange converts html<->text on read."""
    if body is None or wanted is None:
        return dict(body) if body is not None else None
    current = str(body.get("contentType", "text")).lower()
    content = str(body.get("content") or "")
    if current == wanted:
        return {"contentType": wanted, "content": content}
    if wanted == "text":
        return {"contentType": "text", "content": html_to_text(content)}
    escaped = html.escape(content).replace("\n", "<br>\r\n")
    return {"contentType": "html", "content": f"<html><head></head><body>{escaped}</body></html>"}


def normalise_select(text: str | None) -> list[str] | None:
    if not text:
        return None
    props: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if not name:
            continue
        canon = _ALL.get(name.lower())
        if canon is None:
            raise GraphError(400, "RequestBroker--ParseUri",
                             f"Could not find a property named '{name}' on type 'microsoft.graph.message'.")
        if canon not in props:
            props.append(canon)
    return props


def _extended_props(data: Mapping[str, Any], filter_text: str | None) -> list[dict[str, str]]:
    """The item's extended properties, those named in ``$filter`` (``id eq '...' or id eq '...'``) or all.
    Ids compare case-insensitively; each is returned in the form it was created with."""
    values: dict[str, tuple[str, str]] = {}
    for prop_id, key in _EXTENDED.items():
        value = data.get(key)
        if isinstance(value, list):
            value = " ".join(value)
        if value:
            values[prop_id] = ("String " + prop_id.split()[1], str(value))
    for prop_id, value in (data.get("_extended") or {}).items():
        values[" ".join(prop_id.split()).lower()] = (prop_id, str(value))
    wanted = set(values)
    if filter_text:
        wanted = {" ".join(m.split()).lower() for m in re.findall(r"'([^']+)'", filter_text)} & wanted
    return [{"id": values[k][0], "value": values[k][1]} for k in sorted(wanted)]


def message_properties(data: Mapping[str, Any], select: list[str] | None, body_type: str | None
                       ) -> dict[str, Any]:
    props = select if select is not None else list(DEFAULT_PROPS)
    out: dict[str, Any] = {}
    for prop in props:
        if prop in ("id", "parentFolderId"):
            continue
        if prop == "internetMessageHeaders" and prop not in data:
            continue  # drafts and Sent Items copies: "not even set" (graph.md §7.2), only delivered mail has them
        if prop == "body":
            out["body"] = convert_body(data.get("body") or _DEFAULTS["body"], body_type)
        elif prop == "uniqueBody":
            out["uniqueBody"] = convert_body(data.get("uniqueBody") or data.get("body") or _DEFAULTS["body"],
                                             body_type)
        elif prop == "bodyPreview":
            out["bodyPreview"] = data.get("bodyPreview") or body_preview(data.get("body"))
        else:
            value = data.get(prop, _DEFAULTS.get(prop))
            out[prop] = value
    return out


def render_message(store: Store, row: MessageRow, *, select: list[str] | None, expand: dict[str, dict[str, str]],
                   immutable: bool, body_type: str | None, base_url: str, with_type: bool = False
                   ) -> dict[str, Any]:
    data = row.data
    out: dict[str, Any] = {}
    if with_type:
        out["@odata.type"] = "#microsoft.graph.message"
    out["@odata.etag"] = f'W/"{data.get("changeKey", "")}"'
    out["id"] = row.id_for(immutable)
    props = message_properties(data, select, body_type)
    if select is None or "parentFolderId" in select:
        props["parentFolderId"] = row.folder_id
    if select is None:
        # keep Graph's property order: parentFolderId sits between importance and conversationId
        ordered = {k: props[k] for k in DEFAULT_PROPS if k in props}
        props = ordered
    out.update(props)
    if select is None or "webLink" in (select or []):
        if "webLink" in out:
            root = base_url.rsplit("/v1.0", 1)[0]
            out["webLink"] = f"{root}/owa/?ItemID={row.rid}&exvsurl=1&viewmodel=ReadMessageItem"
    for name, opts in expand.items():
        if name == "attachments":
            sub_select = opts.get("$select")
            atts = []
            for aid, meta, content in store.list_attachments(row.iid):
                rendered = render_attachment(aid, meta, content, expand_item=False)
                if sub_select:
                    keep = {s.strip().lower() for s in sub_select.split(",")} | {"id", "@odata.type"}
                    rendered = {k: v for k, v in rendered.items() if k.lower() in keep}
                atts.append(rendered)
            out["attachments"] = atts
        elif name == "singlevalueextendedproperties":
            out["singleValueExtendedProperties"] = _extended_props(data, opts.get("$filter"))
        else:
            raise GraphError(400, "BadRequest", f"Parsing OData Select and Expand failed: Could not find a property "
                                                f"named '{name}' on type 'microsoft.graph.message'.")
    return out


def render_item(item: Mapping[str, Any], body_type: str | None = None, *, with_attachments: bool = False,
                select: list[str] | None = None) -> dict[str, Any]:
    """The message inside an itemAttachment: ``@odata.type`` + ``"id": ""`` + its default properties, or those
    ``$select``ed inside the expand (``internetMessageHeaders`` only then: graph.md §6.1, attachment-get
    example 3 lists default properties only)."""
    out: dict[str, Any] = {"@odata.type": "#microsoft.graph.message", "id": ""}
    props = message_properties(item, select, body_type)
    props.pop("parentFolderId", None)
    props.pop("webLink", None)
    props.pop("changeKey", None)
    if select is None or "hasAttachments" in select:
        props["hasAttachments"] = any(not a.get("isInline") for a in item.get("attachments") or [])
    out.update(props)
    if with_attachments:
        out["attachments"] = [render_attachment(f"{i}", a, None, expand_item=False)
                              for i, a in enumerate(item.get("attachments") or [])]
    return out


def render_attachment(aid: str, meta: Mapping[str, Any], content: bytes | None, *, expand_item: bool,
                      item_expand_opts: Mapping[str, str] | None = None) -> dict[str, Any]:
    odata_type = str(meta.get("@odata.type") or "#microsoft.graph.fileAttachment")
    is_item = odata_type.lower().endswith("itemattachment")
    out: dict[str, Any] = {"@odata.type": "#microsoft.graph.itemAttachment" if is_item
                           else "#microsoft.graph.fileAttachment"}
    if not is_item:
        out["@odata.mediaContentType"] = meta.get("contentType") or "application/octet-stream"
    out.update({
        "id": aid,
        "lastModifiedDateTime": meta.get("lastModifiedDateTime"),
        "name": meta.get("name") or ("Untitled" if is_item else "attachment"),
        "contentType": None if is_item else (meta.get("contentType") or "application/octet-stream"),
        "size": int(meta.get("size") or 0),
        "isInline": bool(meta.get("isInline", False)),
    })
    if is_item:
        if expand_item:
            nested = item_expand_opts or {}
            out["item@odata.context"] = "#microsoft.graph.message"
            out["item"] = render_item(meta.get("item") or {},
                                      with_attachments="attachments" in (nested.get("$expand") or "").lower(),
                                      select=normalise_select(nested.get("$select")))
    else:
        out["contentId"] = meta.get("contentId")
        out["contentLocation"] = meta.get("contentLocation")
        if content is not None:
            out["contentBytes"] = base64.b64encode(content).decode()
        elif meta.get("contentBytes") is not None:  # nested item attachments keep their base64 inline
            out["contentBytes"] = meta["contentBytes"]
    return out


def sort_rows(rows: list[Any], order: list[tuple[str, bool]], key_of: Any) -> list[Any]:
    for path, desc in reversed(order):
        def k(r: Any, p: str = path) -> tuple[int, Any]:
            value = lookup(key_of(r), p)
            if isinstance(value, str):
                value = value.casefold()
            return (0, "") if value is None else (1, value)
        rows = sorted(rows, key=k, reverse=desc)
    return rows
