"""Seed documents: the tenant's domains, users with folders/rules/messages, and per-app mailbox scoping.

Format (JSON; every key optional; ``POST /_emulator/seed`` applies one additively)::

    {
      "tenantId": "<guid>",
      "domains": ["contoso.example"],
      "users": [{
        "id": "<guid>",                       # default: a new GUID
        "userPrincipalName": "alice@contoso.example",
        "displayName": "Alice", "mail": "alice@contoso.example",
        "proxyAddresses": ["smtp:a@contoso.example"],
        "folders": [{"displayName": "Projects", "parent": "inbox"}],   # parent: well-known name or folder name
        "rules": [{"displayName": "...", "sequence": 1, "conditions": {...}, "actions": {...}}],
        "messages": [
          {"folder": "inbox", "mime": "From: ...\\r\\n..."},          # delivered through the MIME parser
          {"folder": "inbox", "subject": "Hi", "from": "bob@example.org", "to": ["alice@contoso.example"],
           "body": "text or <p>html</p>", "isRead": false, "receivedDateTime": "2024-01-01T10:00:00Z"}
        ]
      }],
      "accessPolicies": {"<app id>": ["alice@contoso.example"]},   # legacy ApplicationAccessPolicy scope
      "roleAssignments": {"<app id>": [                             # Exchange RBAC for Applications: grants
          {"role": "Application Mail.ReadWrite", "scope": ["alice@contoso.example"]}]}   # outside the token
    }
"""

from __future__ import annotations

import base64
from typing import Any

from emulators.common import demo

from .mail import MailService
from .render import body_preview
from .store import Store
from .util import GraphError, format_dt, new_id, now_utc, parse_dt

__all__ = ["DEMO_USERS", "apply_seed", "default_seed"]

# Stable ids so the stack, the Dataverse emulator's seed and tests can refer to the same people.
DEMO_USERS: tuple[tuple[str, str, str], ...] = (
    ("c0ffee00-0000-4000-8000-000000000101", "alice", "Alice Archer"),
    ("c0ffee00-0000-4000-8000-000000000102", "bob", "Bob Baker"),
    ("c0ffee00-0000-4000-8000-000000000103", "carol", "Carol Carter"),
    ("c0ffee00-0000-4000-8000-000000000104", "dave", "Dave Dawson"),
    ("c0ffee00-0000-4000-8000-000000000110", "crm-sink", "CRM Forward Mailbox"),
    ("c0ffee00-0000-4000-8000-000000000111", "support", "Support Queue"),
)


def default_seed() -> dict[str, Any]:
    return {
        "tenantId": demo.TENANT_ID,
        "domains": [demo.TENANT_DOMAIN],
        "users": [{"id": uid, "userPrincipalName": f"{alias}@{demo.TENANT_DOMAIN}", "displayName": name,
                   "mail": f"{alias}@{demo.TENANT_DOMAIN}"} for uid, alias, name in DEMO_USERS],
    }


def _recipients(value: Any) -> list[dict[str, Any]]:
    items = value if isinstance(value, list) else [value] if value else []
    out = []
    for item in items:
        if isinstance(item, dict):
            out.append(item)
        else:
            out.append({"emailAddress": {"name": str(item), "address": str(item)}})
    return out


def apply_seed(store: Store, mail: MailService, seed: dict[str, Any]) -> dict[str, Any]:
    """Apply a seed document; returns a summary (user ids by UPN)."""
    if not isinstance(seed, dict):
        raise GraphError(400, "BadRequest", "A seed must be a JSON object.")
    if seed.get("tenantId"):
        store.set_meta("tenantId", seed["tenantId"])
    store.add_domains(seed.get("domains") or [])
    created: dict[str, str] = {}
    for spec in seed.get("users") or []:
        upn = spec.get("userPrincipalName")
        if not upn:
            raise GraphError(400, "BadRequest", "Every seeded user needs a userPrincipalName.")
        store.add_domains([upn.rsplit("@", 1)[-1]])
        existing = store.get_user(spec.get("id") or upn)
        user = existing or store.add_user(upn=upn, display_name=spec.get("displayName") or "", mail=spec.get("mail"),
                                          user_id=spec.get("id"), proxy_addresses=spec.get("proxyAddresses") or [])
        created[user.upn] = user.id
        for folder in spec.get("folders") or []:
            parent_ref = folder.get("parent")
            parent = store.folder(user.id, parent_ref) if parent_ref else None
            if parent is None and parent_ref:
                parent = next((f for f in _all_folders(store, user.id) if f.display_name == parent_ref), None)
            siblings = store.child_folders(user.id, parent.id if parent else None)
            if not any(f.display_name == folder["displayName"] for f in siblings):
                store.create_folder(user.id, parent.id if parent else None, folder["displayName"])
        for rule in spec.get("rules") or []:
            store.put_rule(user.id, {"id": rule.get("id") or new_id("rule", 12), "isEnabled": True,
                                     "sequence": rule.get("sequence", 1), **rule})
        for msg in spec.get("messages") or []:
            _seed_message(store, mail, user.id, msg)
    policies = seed.get("accessPolicies") or {}
    return {"users": created, "accessPolicies": policies, "roleAssignments": seed.get("roleAssignments") or {}}


def _all_folders(store: Store, user_id: str) -> list[Any]:
    out = []
    queue = store.child_folders(user_id, None)
    while queue:
        folder = queue.pop()
        out.append(folder)
        queue.extend(store.child_folders(user_id, folder.id))
    return out


def _seed_message(store: Store, mail: MailService, user_id: str, msg: dict[str, Any]) -> None:
    user = store.get_user(user_id)
    assert user is not None
    ref = msg.get("folder") or "inbox"
    folder = store.folder(user_id, ref) or next(
        (f for f in _all_folders(store, user_id) if f.display_name == ref), None)
    if folder is None:
        raise GraphError(400, "BadRequest", f"Unknown folder {ref!r} in seed for {user.upn}.")
    if msg.get("mime"):
        raw = msg["mime"].encode() if isinstance(msg["mime"], str) else base64.b64decode(msg["mimeBase64"])
        rows = mail.deliver_inbound(str(msg.get("envelopeFrom") or "seed@localhost"), [user.mail], raw)
        for row in rows:
            if folder.id != row.folder_id:
                store.move_message(row, folder.id)
        return
    body_text = str(msg.get("body") or "")
    body = {"contentType": "html" if body_text.lstrip().startswith("<") else "text", "content": body_text}
    stamp = format_dt(parse_dt(msg["receivedDateTime"])) if msg.get("receivedDateTime") else format_dt(now_utc())
    sender = _recipients(msg.get("from") or user.mail)[0]
    data = {"subject": msg.get("subject") or "", "body": body, "bodyPreview": body_preview(body), "from": sender,
            "sender": sender, "toRecipients": _recipients(msg.get("to")), "ccRecipients": _recipients(msg.get("cc")),
            "receivedDateTime": stamp, "sentDateTime": stamp, "createdDateTime": stamp,
            "isRead": bool(msg.get("isRead", False)), "isDraft": bool(msg.get("isDraft", False)),
            "importance": msg.get("importance") or "normal", "categories": msg.get("categories") or [],
            "internetMessageId": msg.get("internetMessageId") or mail.new_internet_message_id(),
            "internetMessageHeaders": msg.get("internetMessageHeaders") or []}
    mail._thread(user_id, data)
    store.insert_message(user_id, folder.id, data)
