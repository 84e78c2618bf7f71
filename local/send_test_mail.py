"""Send a test email into the local Exchange (the Graph emulator's SMTP listener), as an outside sender would.

    python -m local.send_test_mail --to erin@contoso.example                      # from Gus (a CRM contact)
    python -m local.send_test_mail --from sam@unknown.example --to support@contoso.example \\
        --subject "Invoice" --attach README.md
    python -m local.send_test_mail --to alice@contoso.example --in-reply-to "<id@host>" --subject "Re: ..."
    python -m local.send_test_mail --to support@contoso.example --auto-reply      # gets skipped
    python -m local.send_test_mail --crm --from alice@contoso.example --to fiona@fabrikam.example \
        --subject "Rollout plan" [--regarding opportunity]                        # "Send" in CRM

``--crm`` does what the CRM UI does when a user presses Send: it creates the email over the Dataverse Web API as
that user (impersonated with ``CallerObjectId``), with the recipient resolved to its CRM record, then calls
``SendEmail`` (``IssueSend: true``): the email is Pending Send and the router sends it through the user's mailbox.

The SMTP address comes from ``.local/stack.json`` (``graph.smtp``) unless ``--smtp host:port`` is given. Prints
the Message-ID, which ``emailrouter explain`` and the CRM ``email.messageid`` column show. Only stdlib
(``smtplib``, ``email``): the same thing ``swaks`` or any mail client would do.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import smtplib
import ssl
import sys
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid
from pathlib import Path
from typing import Any

__all__ = ["build_message", "send_from_crm", "send_mail", "smtp_endpoint"]


def smtp_endpoint(state_dir: Path) -> tuple[str, int]:
    """``(host, port)`` of the running stack's SMTP listener, from ``<state_dir>/stack.json``."""
    doc = json.loads((state_dir / "stack.json").read_text())
    host, _, port = str(doc["graph"]["smtp"]).rpartition(":")
    return host, int(port)


def build_message(
    *,
    sender: str,
    to: Sequence[str],
    subject: str,
    body: str,
    cc: Sequence[str] = (),
    sender_name: str = "",
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    headers: Mapping[str, str] | None = None,
    attachments: Sequence[tuple[str, bytes, str]] = (),
    html: str | None = None,
) -> EmailMessage:
    """A standard internet message; ``attachments`` are ``(filename, content, mime type)``."""
    msg = EmailMessage()
    msg["From"] = formataddr((sender_name, sender)) if sender_name else sender
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id or make_msgid(idstring=uuid.uuid4().hex[:12], domain=sender.rpartition("@")[2])
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = " ".join([*references, in_reply_to]) if in_reply_to not in references else \
            " ".join(references)
    elif references:
        msg["References"] = " ".join(references)
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for filename, content, mime in attachments:
        maintype, _, subtype = mime.partition("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype or "octet-stream", filename=filename)
    return msg


def send_mail(smtp: tuple[str, int], message: EmailMessage, *, envelope_from: str | None = None,
              timeout: float = 30) -> str:
    """Deliver over SMTP to every To/Cc recipient; returns the Message-ID. Raises on any refused recipient."""
    rcpts = [a.strip() for field in ("To", "Cc") for a in str(message.get(field, "")).split(",") if a.strip()]
    with smtplib.SMTP(smtp[0], smtp[1], timeout=timeout) as client:
        refused = client.send_message(message, from_addr=envelope_from, to_addrs=rcpts)
    if refused:
        raise smtplib.SMTPRecipientsRefused(refused)
    return str(message["Message-ID"])


def send_from_crm(stack: Mapping[str, Any], *, sender: str, to: str, subject: str, html: str,
                  regarding: tuple[str, str] | None = None) -> dict[str, Any]:
    """Create an email as the CRM user ``sender`` to the record whose address is ``to`` and ``SendEmail`` it.

    ``regarding`` = ``(entity set, id)``. Returns ``{"activityid", "subject", "trackingtoken", "status"}``."""
    import httpx

    bundle = ssl.create_default_context(cafile=str(stack["ca_bundle"]))
    org = str(stack["dataverse"]["url"]).rstrip("/")
    api = str(stack["dataverse"]["api_url"]).rstrip("/")
    token = httpx.post(f"{str(stack['identity']['authority']).rstrip('/')}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": stack["app"]["client_id"],
        "client_secret": stack["app"]["client_secret"], "scope": f"{org}/.default"}, verify=bundle, timeout=30)
    token.raise_for_status()
    headers = {"Authorization": f"Bearer {token.json()['access_token']}", "Accept": "application/json",
               "OData-MaxVersion": "4.0", "OData-Version": "4.0",
               "Prefer": 'odata.include-annotations="OData.Community.Display.V1.FormattedValue"'}
    with httpx.Client(verify=bundle, headers=headers, timeout=30) as client:
        def one(entity_set: str, filter: str, select: str) -> dict[str, Any] | None:
            resp = client.get(f"{api}/{entity_set}", params={"$filter": filter, "$select": select, "$top": "1"})
            resp.raise_for_status()
            rows = resp.json().get("value", [])
            return dict(rows[0]) if rows else None

        quoted = sender.replace("'", "''")
        user = one("systemusers", f"internalemailaddress eq '{quoted}'", "systemuserid,azureactivedirectoryobjectid")
        if user is None:
            raise ValueError(f"{sender} is not a CRM user")
        addr = to.replace("'", "''")
        party: dict[str, Any] = {"participationtypemask": 2, "addressused": to}
        for entity_set, table, key, column in (("contacts", "contact", "contactid", "emailaddress1"),
                                               ("accounts", "account", "accountid", "emailaddress1"),
                                               ("leads", "lead", "leadid", "emailaddress1"),
                                               ("systemusers", "systemuser", "systemuserid", "internalemailaddress")):
            found = one(entity_set, f"{column} eq '{addr}'", key)
            if found is not None:
                party = {"participationtypemask": 2, f"partyid_{table}@odata.bind": f"/{entity_set}({found[key]})"}
                break
        activity_id = str(uuid.uuid4())
        body: dict[str, Any] = {
            "activityid": activity_id, "subject": subject, "description": html, "directioncode": True,
            "email_activity_parties": [
                {"participationtypemask": 1, "partyid_systemuser@odata.bind": f"/systemusers({user['systemuserid']})"},
                party,
            ],
        }
        if regarding is not None:
            entity_set, rid = regarding
            table = {"opportunities": "opportunity", "incidents": "incident", "accounts": "account",
                     "contacts": "contact", "leads": "lead"}[entity_set]
            body[f"regardingobjectid_{table}_email@odata.bind"] = f"/{entity_set}({rid})"
        as_user = {"CallerObjectId": str(user["azureactivedirectoryobjectid"])}
        client.post(f"{api}/emails", json=body, headers=as_user).raise_for_status()
        client.post(f"{api}/emails({activity_id})/Microsoft.Dynamics.CRM.SendEmail",
                    json={"IssueSend": True, "TrackingToken": ""}, headers=as_user).raise_for_status()
        row = client.get(f"{api}/emails({activity_id})", params={"$select": "subject,trackingtoken,statuscode"})
        row.raise_for_status()
        data = row.json()
    return {"activityid": activity_id, "subject": data.get("subject"), "trackingtoken": data.get("trackingtoken"),
            "status": data.get("statuscode@OData.Community.Display.V1.FormattedValue") or data.get("statuscode")}


def _crm_main(args: argparse.Namespace) -> int:
    try:
        stack = json.loads((args.state_dir / "stack.json").read_text())
    except (OSError, ValueError):
        print(f"no running stack found in {args.state_dir} (start it with `make run`)", file=sys.stderr)
        return 2
    regarding = None
    if args.regarding:
        from local.demo_org import CASE, OPPORTUNITY

        record = {"opportunity": OPPORTUNITY, "case": CASE}[args.regarding]
        regarding = (record.entity_set, record.id)
    try:
        sent = send_from_crm(stack, sender=args.sender, to=args.to[0], subject=args.subject,
                             html=f"<p>{args.body}</p>", regarding=regarding)
    except (OSError, ValueError) as exc:
        print(f"sending from CRM failed: {exc}", file=sys.stderr)
        return 1
    print(f"CRM email {sent['activityid']}: '{sent['subject']}' is {sent['status']} "
          f"(tracking token {sent['trackingtoken']}); the router's outbound scan sends it within 15 s")
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m local.send_test_mail", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="sender", default="gus@example.org", help="default: Gus Gray, a CRM contact")
    p.add_argument("--name", default="", help="sender display name")
    p.add_argument("--to", action="append", required=True, help="repeat for several recipients")
    p.add_argument("--cc", action="append", default=[])
    p.add_argument("--subject", default="Hello from the walkthrough")
    p.add_argument("--body", default="This message was sent with python -m local.send_test_mail.")
    p.add_argument("--attach", action="append", type=Path, default=[], help="file to attach (repeatable)")
    p.add_argument("--in-reply-to", help="Message-ID this mail replies to (correlation by In-Reply-To)")
    p.add_argument("--auto-reply", action="store_true", help="mark as an automatic reply (Auto-Submitted)")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="extra header")
    p.add_argument("--crm", action="store_true",
                   help="send FROM CRM instead: --from is the CRM user, --to the recipient's address")
    p.add_argument("--regarding", choices=("opportunity", "case"), help="with --crm: set Regarding to the demo "
                   "org's opportunity or case")
    p.add_argument("--smtp", help="host:port (default: graph.smtp from <state-dir>/stack.json)")
    p.add_argument("--state-dir", type=Path, default=Path(".local"))
    args = p.parse_args(argv)
    if args.crm:
        if args.sender == p.get_default("sender"):
            args.sender = "alice@contoso.example"
        return _crm_main(args)
    if args.smtp:
        host, _, port = args.smtp.rpartition(":")
        endpoint = (host or "127.0.0.1", int(port))
    else:
        try:
            endpoint = smtp_endpoint(args.state_dir)
        except (OSError, ValueError, KeyError):
            print(f"no running stack found in {args.state_dir} (start it with `make run`) - or pass --smtp",
                  file=sys.stderr)
            return 2
    headers = dict(h.split(":", 1) for h in args.header if ":" in h)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    if args.auto_reply:
        headers.setdefault("Auto-Submitted", "auto-replied")
    attachments = []
    for path in args.attach:
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        attachments.append((path.name, path.read_bytes(), mime))
    msg = build_message(sender=args.sender, sender_name=args.name, to=args.to, cc=args.cc, subject=args.subject,
                        body=args.body, in_reply_to=args.in_reply_to, headers=headers, attachments=attachments)
    try:
        mid = send_mail(endpoint, msg)
    except (OSError, smtplib.SMTPException) as exc:
        print(f"sending failed: {exc}", file=sys.stderr)
        return 1
    print(f"sent {mid} to {', '.join(args.to + args.cc)} via {endpoint[0]}:{endpoint[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
