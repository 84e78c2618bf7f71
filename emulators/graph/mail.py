"""Mail flow: drafts, sendMail, local delivery, inbound (SMTP) delivery, inbox rules, outbox, NDRs.

Every message between mailboxes travels as MIME (``mime.build_mime`` then ``mime.parse_message``), the
same path external mail takes over SMTP, so what a recipient sees (headers, Message-ID, In-Reply-To,
References, Thread-Index, item attachments) is what Exchange transport would have produced.
"""

from __future__ import annotations

import base64
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .config import GraphConfig
from .conversation import child_index, conversation_id_for, index_from_b64, new_conversation_index
from .render import body_preview
from .store import MessageRow, Store, User
from .util import GraphError, format_dt, now_utc

log = logging.getLogger("emulators.graph.mail")

__all__ = ["MailService"]

_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")
_MAX_HOPS = 4  # rule-generated mail may trigger rules again; Exchange stops loops, so do we
_LOOP_HEADER = "X-MS-Exchange-Inbox-Rules-Loop"
_MESSAGE_FIELDS = ("subject", "body", "importance", "toRecipients", "ccRecipients", "bccRecipients", "replyTo",
                   "from", "sender", "categories", "flag", "isDeliveryReceiptRequested", "isReadReceiptRequested",
                   "uniqueBody")
# Where a message's data keeps what the client set but Graph does not show as a property:
# the custom x-headers of a draft (written into the MIME on send; a draft and its Sent Items copy have no
# internetMessageHeaders, only delivered mail has them - graph.md §7.2) and its extended MAPI properties.
DRAFT_HEADERS = "_draftHeaders"
EXTENDED = "_extended"
# MAPI properties the message model maps onto its own fields (graph.md §6).
_MAPPED_PROPERTIES = {"string 0x1042", "string 0x1039", "string 0x1035"}
_PROPERTY_ID = re.compile(
    r"^(?:Binary|Boolean|Currency|CLSID|Double|Integer|Long|Object|Short|String|SystemTime)\s+"
    r"(?:0x[0-9A-Fa-f]{1,4}|\{[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}\}\s+"
    r"(?:Name\s+\S.*|Id\s+0x[0-9A-Fa-f]{1,4}))$")


def chosen_internet_message_id(value: Any) -> str:
    """A client-chosen internetMessageId for a draft: an RFC 5322 msg-id ``<left@right>`` (at most 320 characters,
    no whitespace). What Exchange does with anything else is not documented: refused here (the stricter reading)."""
    text = value if isinstance(value, str) else ""
    left, at, right = text[1:-1].partition("@")
    if (len(text) > 320 or not (text.startswith("<") and text.endswith(">")) or not at or not left or not right
            or any(c.isspace() or c in "<>" for c in text[1:-1]) or "@" in right):
        raise GraphError(400, "ErrorInvalidProperty", "The internetMessageId must be an RFC 5322 msg-id such as "
                         "<id@domain>.")
    return text


def _ci(mapping: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """Case-insensitive key lookup: sendMail's parameters arrive PascalCase from the SDK (graph.md §7.1)."""
    if name in mapping:
        return mapping[name]
    low = name.lower()
    for key, value in mapping.items():
        if key.lower() == low:
            return value
    return default


def _recipient(value: Any) -> dict[str, Any]:
    email = _ci(value, "emailAddress") if isinstance(value, Mapping) else None
    if not isinstance(email, Mapping):
        raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient isn't valid.")
    address = str(_ci(email, "address") or "").strip()
    if not _ADDRESS.match(address):
        raise GraphError(400, "ErrorInvalidRecipients",
                         f"At least one recipient isn't valid., Recipient '{address}' is not resolved.")
    return {"emailAddress": {"name": str(_ci(email, "name") or address), "address": address}}


def _addresses(recipients: Iterable[Mapping[str, Any]]) -> list[str]:
    return [str(r.get("emailAddress", {}).get("address", "")) for r in recipients or []]


def validate_custom_headers(headers: Any) -> list[dict[str, str]]:
    """graph.md §7.3: only x-/X- names, at most 5, 256 KB in total."""
    if headers is None:
        return []
    if not isinstance(headers, list):
        raise GraphError(400, "InvalidInternetMessageHeaderCollection", "internetMessageHeaders must be a collection.")
    out: list[dict[str, str]] = []
    total = 0
    for h in headers:
        name = str(_ci(h, "name") or "") if isinstance(h, Mapping) else ""
        value = str(_ci(h, "value") or "") if isinstance(h, Mapping) else ""
        if not name.lower().startswith("x-"):
            raise GraphError(400, "InvalidInternetMessageHeader",
                             f"The internet message header name '{name}' should start with 'x-' or 'X-'.")
        total += len(name) + len(value)
        out.append({"name": name, "value": value})
    if len(out) > 5:
        raise GraphError(400, "InvalidInternetMessageHeaderCollection",
                         "Maximum number of headers in one message should be less than or equal to 5.")
    if total > 256 * 1024:
        raise GraphError(400, "InvalidInternetMessageHeaderCollection",
                         "Maximum size of internet message headers should be less than or equal to 256 KB.")
    return out


def extended_properties(value: Any) -> dict[str, str]:
    """``singleValueExtendedProperties`` of a create request -> {id: value}; ids in Graph's documented forms
    (``String 0x1042``, ``String {guid} Name X``, ``Integer {guid} Id 0x8005``)."""
    if value is None:
        return {}
    if not isinstance(value, list):
        raise GraphError(400, "ErrorInvalidRequest", "singleValueExtendedProperties must be a collection.")
    out: dict[str, str] = {}
    for entry in value:
        prop = str(_ci(entry, "id") or "").strip() if isinstance(entry, Mapping) else ""
        if not _PROPERTY_ID.match(prop):
            raise GraphError(400, "ErrorInvalidProperty", f"The extended property id '{prop}' is not valid.")
        out[prop] = str(_ci(entry, "value") or "")
    return out


def sent_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    """A message as its sender's Sent Items keeps it: whatever transport headers it was given move into the
    draft headers (written into its MIME, not shown as internetMessageHeaders)."""
    out = dict(data)
    headers = out.pop("internetMessageHeaders", None)
    if headers and not out.get(DRAFT_HEADERS):
        out[DRAFT_HEADERS] = [h for h in headers if str(h.get("name", "")).lower().startswith("x-")]
    return out


class MailService:
    def __init__(self, store: Store, config: GraphConfig) -> None:
        self.store = store
        self.config = config
        self._tmp: Path | None = None
        if config.outbox_dir is not None:
            self.outbox_dir = config.outbox_dir
        else:
            self._tmp = Path(tempfile.mkdtemp(prefix="graph-outbox-"))
            self.outbox_dir = self._tmp
        self.outbox_dir.mkdir(parents=True, exist_ok=True)
        self._outbox_lock = threading.Lock()
        self._outbox_n = 0

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- addresses -----------------------------------------------------------------------------
    def is_local_domain(self, address: str) -> bool:
        return address.rsplit("@", 1)[-1].lower() in self.store.domains()

    def accepts_recipient(self, address: str) -> bool:
        """SMTP RCPT TO: local users only (unknown local -> 550, foreign domains -> no relay)."""
        return self.store.user_by_address(address.strip().strip("<>")) is not None

    def _domain(self) -> str:
        domains = self.store.domains()
        return domains[0] if domains else "emulator.local"

    def new_internet_message_id(self) -> str:
        from . import mime

        return mime.make_message_id(self._domain())

    # -- composing -----------------------------------------------------------------------------
    def _message_from_payload(self, user: User, payload: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict]]:
        if not isinstance(payload, Mapping):
            raise GraphError(400, "ErrorInvalidRequest", "The message body is missing or malformed.")
        data: dict[str, Any] = {}
        for name in _MESSAGE_FIELDS:
            value = _ci(payload, name)
            if value is not None:
                data[name] = value
        for key in ("toRecipients", "ccRecipients", "bccRecipients", "replyTo"):
            data[key] = [_recipient(r) for r in data.get(key) or []]
        body = data.get("body") or {"contentType": "text", "content": ""}
        data["body"] = {"contentType": str(_ci(body, "contentType") or "text").lower(),
                        "content": str(_ci(body, "content") or "")}
        data["importance"] = str(data.get("importance") or "normal").lower()
        data[DRAFT_HEADERS] = validate_custom_headers(_ci(payload, "internetMessageHeaders"))
        me = {"emailAddress": {"name": user.display_name, "address": user.mail}}
        data["from"] = _recipient(data["from"]) if data.get("from") else me
        data["sender"] = _recipient(data["sender"]) if data.get("sender") else me
        extended = extended_properties(_ci(payload, "singleValueExtendedProperties"))
        for prop, value in extended.items():
            if prop.lower() == "string 0x1042":
                data["_inReplyTo"] = value
            elif prop.lower() == "string 0x1039":
                data["_references"] = value.split()
            elif prop.lower() == "string 0x1035" and value:
                data["internetMessageId"] = value
        unmapped = {k: v for k, v in extended.items() if k.lower() not in _MAPPED_PROPERTIES}
        if unmapped:
            data[EXTENDED] = unmapped
        attachments = [self._attachment_from_payload(a) for a in _ci(payload, "attachments") or []]
        return data, attachments

    def _attachment_from_payload(self, att: Mapping[str, Any]) -> dict[str, Any]:
        odata_type = str(_ci(att, "@odata.type") or "").lower()
        name = str(_ci(att, "name") or "")
        if odata_type.endswith("itemattachment"):
            item = _ci(att, "item") or {}
            return {"@odata.type": "#microsoft.graph.itemAttachment", "name": name or item.get("subject") or "Untitled",
                    "contentType": "message/rfc822", "isInline": False, "item": dict(item),
                    "size": len(str(item))}
        if odata_type and not odata_type.endswith("fileattachment"):
            raise GraphError(400, "ErrorInvalidRequest", f"Attachment type {odata_type!r} is not supported.")
        raw_b64 = _ci(att, "contentBytes")
        if raw_b64 is None or not name:
            raise GraphError(400, "ErrorInvalidRequest", "A file attachment needs name and contentBytes.")
        try:
            content = base64.b64decode(str(raw_b64), validate=True)
        except ValueError:
            raise GraphError(400, "ErrorInvalidRequest", "contentBytes is not valid base64.") from None
        if len(content) > self.config.max_simple_attachment_bytes:
            raise GraphError(413, "ErrorRequestEntityTooLarge",
                             "The attachment exceeds 3 MB; use an upload session (createUploadSession).")
        return {"@odata.type": "#microsoft.graph.fileAttachment", "name": name,
                "contentType": str(_ci(att, "contentType") or "application/octet-stream"),
                "isInline": bool(_ci(att, "isInline") or False), "contentId": _ci(att, "contentId"),
                "contentBytes": base64.b64encode(content).decode()}

    def _thread(self, user_id: str, data: dict[str, Any], index_b64: str | None = None) -> None:
        """conversationIndex/Id: Thread-Index if present, else a child of a known parent, else new."""
        now = now_utc()
        index = index_from_b64(index_b64)
        if index is None:
            related = [data.get("_inReplyTo") or "", *(data.get("_references") or [])]
            parents = self.store.find_by_internet_id(user_id, [r for r in related if r])
            parent_index = next((index_from_b64(p.data.get("conversationIndex")) for p in reversed(parents)
                                 if p.data.get("conversationIndex")), None)
            index = child_index(parent_index, now) if parent_index else new_conversation_index(now)
        data["conversationIndex"] = base64.b64encode(index).decode()
        data["conversationId"] = conversation_id_for(index)

    def create_draft(self, user: User, payload: Mapping[str, Any], folder_ref: str = "drafts") -> MessageRow:
        data, attachments = self._message_from_payload(user, payload)
        chosen = _ci(payload, "internetMessageId")
        if chosen is not None:  # "Updatable only if isDraft = true" (message-update): a draft may carry its own
            data["internetMessageId"] = chosen_internet_message_id(chosen)
        folder = self.store.folder(user.id, folder_ref)
        if folder is None:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        now = format_dt(now_utc())
        data.update({"isDraft": True, "isRead": True, "createdDateTime": now, "receivedDateTime": now,
                     "sentDateTime": now})
        data.setdefault("internetMessageId", self.new_internet_message_id())
        data["bodyPreview"] = body_preview(data["body"])
        self._thread(user.id, data)
        return self.store.insert_message(user.id, folder.id, data, attachments=attachments)

    def send_draft(self, user: User, row: MessageRow) -> MessageRow:
        if not row.data.get("isDraft"):
            raise GraphError(400, "ErrorInvalidOperation", "Only draft messages can be sent.")
        attachments = self._attachments_for_send(row)
        self._deliver_outgoing(user, row.data, attachments)
        sent = self.store.folder(user.id, "sentitems")
        assert sent is not None
        now = format_dt(now_utc())
        # A sent draft always lands in Sent Items (no option, graph.md §7.2); the REST id changes with the move.
        return self.store.move_message(row, sent.id, {"isDraft": False, "isRead": True, "sentDateTime": now,
                                                      "receivedDateTime": now})

    def send_mail(self, user: User, payload: Mapping[str, Any], save_to_sent_items: bool) -> None:
        data, attachments = self._message_from_payload(user, payload)
        now = format_dt(now_utc())
        data.setdefault("internetMessageId", self.new_internet_message_id())
        data["bodyPreview"] = body_preview(data["body"])
        self._thread(user.id, data)
        self._deliver_outgoing(user, data, attachments)
        if save_to_sent_items:
            sent = self.store.folder(user.id, "sentitems")
            assert sent is not None
            data.update({"isDraft": False, "isRead": True, "createdDateTime": now, "sentDateTime": now,
                         "receivedDateTime": now})
            self.store.insert_message(user.id, sent.id, sent_copy(data), attachments=attachments)

    def send_mime(self, user: User, raw_b64: bytes, save_to_sent_items: bool = True) -> None:
        """sendMail with a base64 MIME body (Content-Type: text/plain)."""
        from . import mime

        try:
            raw = base64.b64decode(raw_b64.strip(), validate=True)
        except ValueError:
            raise GraphError(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.") \
                from None
        try:
            parsed = mime.parse_message(raw)
        except mime.MimeRejected as exc:
            raise GraphError(400, "ErrorMimeContentInvalid", f"Invalid MIME content: {exc}") from None
        parsed["from"] = parsed.get("from") or {"emailAddress": {"name": user.display_name, "address": user.mail}}
        data = self._data_from_parsed(parsed)
        data.setdefault("internetMessageId", self.new_internet_message_id())
        if not data.get("internetMessageId"):
            data["internetMessageId"] = self.new_internet_message_id()
        self._thread(user.id, data, parsed.get("conversationIndex"))
        attachments = list(parsed.get("attachments") or [])
        self._deliver_outgoing(user, data, attachments)
        if save_to_sent_items:
            sent = self.store.folder(user.id, "sentitems")
            assert sent is not None
            now = format_dt(now_utc())
            data.update({"isDraft": False, "isRead": True, "sentDateTime": now, "receivedDateTime": now})
            self.store.insert_message(user.id, sent.id, sent_copy(data), attachments=attachments)

    def _attachments_for_send(self, row: MessageRow) -> list[dict[str, Any]]:
        out = []
        for _aid, meta, content in self.store.list_attachments(row.iid):
            att = dict(meta)
            if content is not None:
                att["contentBytes"] = base64.b64encode(content).decode()
            out.append(att)
        return out

    # -- transport -----------------------------------------------------------------------------
    def _mime_dict(self, data: Mapping[str, Any], attachments: list[dict[str, Any]], *, keep_bcc: bool
                   ) -> dict[str, Any]:
        msg = {k: v for k, v in data.items() if not k.startswith("_")}
        msg["internetMessageHeaders"] = data.get(DRAFT_HEADERS) or data.get("internetMessageHeaders") or []
        msg["inReplyTo"] = data.get("_inReplyTo")
        msg["references"] = list(data.get("_references") or [])
        msg["attachments"] = attachments
        if not keep_bcc:
            msg["bccRecipients"] = []
        return msg

    def _deliver_outgoing(self, user: User, data: Mapping[str, Any], attachments: list[dict[str, Any]],
                          *, hop: int = 0, extra_headers: list[tuple[str, str]] | None = None) -> None:
        from . import mime

        to = _addresses(data.get("toRecipients", [])) + _addresses(data.get("ccRecipients", [])) + \
            _addresses(data.get("bccRecipients", []))
        seen: set[str] = set()
        rcpts = [a for a in to if a and not (a.lower() in seen or seen.add(a.lower()))]  # type: ignore[func-returns-value]
        if not rcpts:
            raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient is required, but none were found.")
        if len(rcpts) > 500:
            raise GraphError(400, "ErrorTooManyRecipients", "The message has too many recipients (limit 500).")
        when = now_utc()
        message_id = str(data.get("internetMessageId") or self.new_internet_message_id())
        try:
            raw = mime.build_mime(self._mime_dict(data, attachments, keep_bcc=False), message_id=message_id,
                                  date=when, extra_headers=list(extra_headers or []))
        except ValueError as exc:  # what Graph refuses with 400 (bad contentBytes, header names, nesting)
            raise GraphError(400, "ErrorInvalidRequest", f"The message cannot be sent: {exc}") from None
        sender = str(data.get("from", {}).get("emailAddress", {}).get("address") or user.mail)
        local: list[str] = []
        unknown: list[str] = []
        external: list[str] = []
        for rcpt in rcpts:
            if self.store.user_by_address(rcpt) is not None:
                local.append(rcpt)
            elif self.is_local_domain(rcpt):
                unknown.append(rcpt)
            else:
                external.append(rcpt)
        if local:
            self.deliver_inbound(sender, local, raw, hop=hop, internal=True)
        if external:
            self._to_outbox(sender, external, raw, data, message_id)
        if unknown:
            self._ndr(user, data, unknown)

    def _to_outbox(self, sender: str, rcpts: list[str], raw: bytes, data: Mapping[str, Any], message_id: str) -> None:
        with self._outbox_lock:
            self._outbox_n += 1
            n = self._outbox_n
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", message_id.strip("<>"))[:80]
        path = self.outbox_dir / f"{n:06d}-{safe}.eml"
        path.write_bytes(raw)
        self.store.add_outbox({"from": sender, "to": rcpts, "subject": data.get("subject") or "",
                               "messageId": message_id, "eml": str(path), "at": format_dt(now_utc())})
        if self.config.smarthost is not None:
            host, port = self.config.smarthost
            threading.Thread(target=self._relay, args=(host, port, sender, rcpts, raw), daemon=True).start()

    @staticmethod
    def _relay(host: str, port: int, sender: str, rcpts: list[str], raw: bytes) -> None:
        from . import smtp

        try:
            smtp.relay(host, port, sender, rcpts, raw)
        except Exception as exc:  # a smarthost failure must not break sending; the outbox keeps the copy
            log.warning("smarthost relay to %s:%s failed: %s", host, port, type(exc).__name__)

    def _ndr(self, user: User, data: Mapping[str, Any], unknown: list[str]) -> None:
        """Non-delivery report into the sender's Inbox (Exchange's 550 5.1.10 RecipientNotFound)."""
        inbox = self.store.folder(user.id, "inbox")
        if inbox is None:
            return
        now = format_dt(now_utc())
        postmaster = {"emailAddress": {"name": "Microsoft Outlook", "address": f"postmaster@{self._domain()}"}}
        lines = "\n".join(f"{a}: 550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found" for a in unknown)
        body = {"contentType": "text", "content": f"Your message couldn't be delivered.\n\n{lines}\n"}
        ndr = {"subject": f"Undeliverable: {data.get('subject') or ''}", "body": body,
               "bodyPreview": body_preview(body),
               "from": postmaster, "sender": postmaster, "toRecipients": [{"emailAddress": {
                   "name": user.display_name, "address": user.mail}}], "isRead": False, "isDraft": False,
               "receivedDateTime": now, "sentDateTime": now, "importance": "normal",
               "internetMessageId": self.new_internet_message_id(),
               "internetMessageHeaders": [{"name": "X-MS-Exchange-Message-Is-Ndr", "value": ""}],
               "_inReplyTo": data.get("internetMessageId")}
        self._thread(user.id, ndr)
        self.store.insert_message(user.id, inbox.id, ndr)

    # -- inbound -------------------------------------------------------------------------------
    @staticmethod
    def _data_from_parsed(parsed: Mapping[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for key in ("internetMessageId", "subject", "from", "sender", "toRecipients", "ccRecipients",
                    "bccRecipients", "replyTo", "sentDateTime", "internetMessageHeaders", "body", "importance"):
            if parsed.get(key) is not None:
                data[key] = parsed[key]
        data["importance"] = str(data.get("importance") or "normal").lower()
        data.setdefault("body", {"contentType": "text", "content": ""})
        data.setdefault("sender", data.get("from"))
        data["_inReplyTo"] = parsed.get("inReplyTo")
        data["_references"] = list(parsed.get("references") or [])
        data["bodyPreview"] = body_preview(data["body"])
        return data

    def deliver_inbound(self, envelope_from: str, rcpts: list[str], raw: bytes, *, hop: int = 0,
                        internal: bool = False) -> list[MessageRow]:
        """SMTP and /_emulator/deliver: one Inbox copy per local recipient, then that mailbox's rules.

        ``internal`` = submitted by a mailbox of this tenant (send, rule forwards) rather than received
        anonymously over SMTP; Exchange records that as X-MS-Exchange-Organization-AuthAs.
        """
        from . import mime

        parsed = mime.parse_message(raw)  # MimeRejected propagates: the SMTP listener answers 5xx
        delivered: list[MessageRow] = []
        seen: set[str] = set()
        for rcpt in rcpts:
            user = self.store.user_by_address(rcpt.strip().strip("<>"))
            if user is None or user.id in seen:
                continue
            seen.add(user.id)
            row = self._store_inbound(user, parsed, raw, envelope_from, internal=internal)
            delivered.append(row)
            try:
                self._apply_rules(user, row, hop)
            except Exception:  # a broken rule never loses the delivered message
                log.exception("inbox rules of %s failed", user.upn)
        return delivered

    def _store_inbound(self, user: User, parsed: Mapping[str, Any], raw: bytes, envelope_from: str, *,
                       internal: bool = False) -> MessageRow:
        inbox = self.store.folder(user.id, "inbox")
        assert inbox is not None
        when = now_utc()
        received = (f"from {envelope_from.rsplit('@', 1)[-1] or 'unknown'} by graph-emulator.{self._domain()} "
                    f"with ESMTP; {when.strftime('%a, %d %b %Y %H:%M:%S +0000')}")
        data = self._data_from_parsed(parsed)
        # Exchange's header firewall: organization headers arriving from outside are removed, and transport
        # stamps how the message was authenticated (Internal for the tenant's own submissions).
        kept = [h for h in data.get("internetMessageHeaders") or []
                if not str(h.get("name", "")).lower().startswith("x-ms-exchange-organization-")]
        auth = [{"name": "X-MS-Exchange-Organization-AuthAs", "value": "Internal" if internal else "Anonymous"},
                {"name": "X-MS-Exchange-Organization-AuthSource", "value": f"graph-emulator.{self._domain()}"}]
        data["internetMessageHeaders"] = [{"name": "Received", "value": received}, *auth, *kept]
        if not data.get("internetMessageId"):
            data["internetMessageId"] = self.new_internet_message_id()
        stamp = format_dt(when)
        data.update({"receivedDateTime": stamp, "createdDateTime": stamp, "isRead": False, "isDraft": False})
        data.setdefault("sentDateTime", stamp)
        if not data.get("sentDateTime"):
            data["sentDateTime"] = stamp
        self._thread(user.id, data, parsed.get("conversationIndex"))
        stored_raw = f"Received: {received}\r\n".encode() + raw
        return self.store.insert_message(user.id, inbox.id, data, raw=stored_raw,
                                         attachments=list(parsed.get("attachments") or []))

    # -- inbox rules ---------------------------------------------------------------------------
    def _matches(self, user: User, row: MessageRow, predicates: Mapping[str, Any] | None) -> bool:
        if not predicates:
            return True
        data = row.data
        subject = str(data.get("subject") or "").casefold()
        body = str((data.get("body") or {}).get("content") or "").casefold()
        sender = data.get("from") or {}
        sender_text = " ".join([str(sender.get("emailAddress", {}).get("address", "")),
                                str(sender.get("emailAddress", {}).get("name", ""))]).casefold()
        to_cc = [*(data.get("toRecipients") or []), *(data.get("ccRecipients") or [])]
        rcpt_text = " ".join(f"{r['emailAddress'].get('address', '')} {r['emailAddress'].get('name', '')}"
                             for r in to_cc).casefold()
        rcpt_addrs = {a.lower() for a in _addresses(to_cc)}
        headers = " ".join(f"{h['name']}: {h['value']}" for h in data.get("internetMessageHeaders") or []).casefold()
        checks = {
            "subjectcontains": lambda v: any(str(s).casefold() in subject for s in v),
            "bodycontains": lambda v: any(str(s).casefold() in body for s in v),
            "bodyorsubjectcontains": lambda v: any(str(s).casefold() in body + " " + subject for s in v),
            "sendercontains": lambda v: any(str(s).casefold() in sender_text for s in v),
            "recipientcontains": lambda v: any(str(s).casefold() in rcpt_text for s in v),
            "headercontains": lambda v: any(str(s).casefold() in headers for s in v),
            "fromaddresses": lambda v: str(sender.get("emailAddress", {}).get("address", "")).lower() in
            {str(r.get("emailAddress", {}).get("address", "")).lower() for r in v},
            "senttoaddresses": lambda v: bool(rcpt_addrs & {str(r.get("emailAddress", {}).get("address", "")).lower()
                                                            for r in v}),
            "senttome": lambda v: bool(v) == (user.mail.lower() in rcpt_addrs),
            "hasattachments": lambda v: bool(v) == bool(data.get("hasAttachments")),
            "importance": lambda v: str(v).lower() == str(data.get("importance", "normal")).lower(),
        }
        for key, value in predicates.items():
            if value in (None, [], False) and key.lower() != "hasattachments":
                continue
            check = checks.get(key.lower())
            if check is None:
                log.info("rule predicate %s not emulated; treated as not matching", key)
                return False
            if not check(value):
                return False
        return True

    def _apply_rules(self, user: User, row: MessageRow, hop: int) -> None:
        if hop >= _MAX_HOPS:
            return
        loop_marks = [h["value"].lower() for h in row.data.get("internetMessageHeaders") or []
                      if h.get("name", "").lower() == _LOOP_HEADER.lower()]
        current = row
        for rule in self.store.list_rules(user.id):
            if not rule.get("isEnabled", True):
                continue
            conditions = rule.get("conditions") or {}
            exceptions = rule.get("exceptions") or {}
            if not self._matches(user, current, conditions):
                continue
            if exceptions and self._matches(user, current, exceptions):
                continue
            actions = rule.get("actions") or {}
            current = self._run_actions(user, current, actions, hop, user.mail.lower() in loop_marks)
            if current is None or actions.get("stopProcessingRules"):
                break

    def _run_actions(self, user: User, row: MessageRow, actions: Mapping[str, Any], hop: int, looped: bool
                     ) -> MessageRow | None:
        loop_header = [(_LOOP_HEADER, user.mail)]
        if not looped:
            if actions.get("forwardAsAttachmentTo"):
                item = self._item_of(row)
                wrapper = {"subject": f"FW: {row.data.get('subject') or ''}",
                           "body": {"contentType": "html", "content": "<html><body></body></html>"},
                           "toRecipients": [_recipient(r) for r in actions["forwardAsAttachmentTo"]],
                           "from": {"emailAddress": {"name": user.display_name, "address": user.mail}},
                           "internetMessageId": self.new_internet_message_id(), "importance": "normal"}
                att = {"@odata.type": "#microsoft.graph.itemAttachment", "name": row.data.get("subject") or "Untitled",
                       "contentType": "message/rfc822", "isInline": False, "item": item}
                self._deliver_outgoing(user, wrapper, [att], hop=hop + 1, extra_headers=loop_header)
            if actions.get("forwardTo"):
                original = row.data
                quoted = (f"<html><body><hr><b>From:</b> "
                          f"{original.get('from', {}).get('emailAddress', {}).get('address', '')}<br>"
                          f"<b>Subject:</b> {original.get('subject') or ''}<br><br>"
                          f"{(original.get('body') or {}).get('content', '')}</body></html>")
                fwd = {"subject": f"FW: {original.get('subject') or ''}",
                       "body": {"contentType": "html", "content": quoted},
                       "toRecipients": [_recipient(r) for r in actions["forwardTo"]],
                       "from": {"emailAddress": {"name": user.display_name, "address": user.mail}},
                       "internetMessageId": self.new_internet_message_id(), "importance": "normal"}
                self._deliver_outgoing(user, fwd, self._attachments_for_send(row), hop=hop + 1,
                                       extra_headers=loop_header)
            if actions.get("redirectTo"):
                raw = self.store.raw_mime(row.iid)
                targets = [_recipient(r)["emailAddress"]["address"] for r in actions["redirectTo"]]
                if raw is not None:
                    local = [t for t in targets if self.store.user_by_address(t) is not None]
                    external = [t for t in targets if t not in local and not self.is_local_domain(t)]
                    if local:
                        self.deliver_inbound(user.mail, local, raw, hop=hop + 1, internal=True)
                    if external:
                        self._to_outbox(user.mail, external, raw, row.data, str(row.data.get("internetMessageId")))
        changes: dict[str, Any] = {}
        if actions.get("markAsRead"):
            changes["isRead"] = True
        if actions.get("markImportance"):
            changes["importance"] = str(actions["markImportance"]).lower()
        if actions.get("assignCategories"):
            changes["categories"] = sorted({*(row.data.get("categories") or []), *actions["assignCategories"]})
        if changes:
            row = self.store.update_message(row, changes)
        if actions.get("copyToFolder"):
            dest = self.store.folder(user.id, str(actions["copyToFolder"]))
            if dest is not None:
                copy = self.store.insert_message(user.id, dest.id, dict(row.data), raw=self.store.raw_mime(row.iid))
                self.store.copy_attachments(row.iid, copy.iid)
        if actions.get("permanentDelete"):
            self.store.delete_message(row)
            return None
        if actions.get("delete"):
            deleted = self.store.folder(user.id, "deleteditems")
            assert deleted is not None
            self.store.move_message(row, deleted.id)
            return None
        if actions.get("moveToFolder"):
            dest = self.store.folder(user.id, str(actions["moveToFolder"]))
            if dest is not None:
                row = self.store.move_message(row, dest.id)
        return row

    def _item_of(self, row: MessageRow) -> dict[str, Any]:
        """The original as an item: its properties, transport headers and attachments."""
        data = row.data
        item = {k: v for k, v in data.items() if not k.startswith("_") and k not in (
            "changeKey", "createdDateTime", "lastModifiedDateTime", "isRead", "categories", "flag")}
        item["inReplyTo"] = data.get("_inReplyTo")
        item["references"] = data.get("_references") or []
        item["attachments"] = self._attachments_for_send(row)
        return item

    # -- MIME for $value -----------------------------------------------------------------------
    def mime_of(self, row: MessageRow) -> bytes:
        """Delivered mail keeps its received bytes; drafts and sent items are rendered (as Exchange does)."""
        raw = self.store.raw_mime(row.iid)
        if raw is not None:
            return raw
        headers = row.data.get(DRAFT_HEADERS) or row.data.get("internetMessageHeaders") or []
        return self.mime_of_item({**row.data, "internetMessageHeaders": headers,
                                  "inReplyTo": row.data.get("_inReplyTo"),
                                  "references": row.data.get("_references") or [],
                                  "attachments": self._attachments_for_send(row)})

    @staticmethod
    def mime_of_item(item: Mapping[str, Any]) -> bytes:
        from . import mime
        from .util import parse_dt

        msg = {k: v for k, v in item.items() if not k.startswith("_")}
        try:
            when = parse_dt(str(item.get("sentDateTime"))) if item.get("sentDateTime") else now_utc()
        except ValueError:
            when = now_utc()
        message_id = str(item.get("internetMessageId") or "<unknown@emulator.local>")
        return mime.build_mime(msg, message_id=message_id, date=when)
