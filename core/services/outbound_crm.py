"""The outbound pipeline's CRM port (``OutboundCrmGateway``) and its Dataverse implementation.

The service only ever sees plain values (:class:`CrmEmailState`, :class:`LoadedEmail`,
``core.domain.outbound.CrmOutboundEmail``) and four error types (:class:`ClaimLost`, :class:`EmailGone`,
:class:`CrmUnavailable`, :class:`CrmRejected`); which HTTP status or Dataverse code caused them stays here.

State and status (email.md StateCode/StatusCode): Pending Send {1,6}, Sending {1,7} and Sent {1,3} belong to the
*Completed* state, and "Completed and canceled email is read-only and can't be edited": only ``statecode`` /
``statuscode`` change there. Every change the router makes to an email it sends is therefore a status-only,
If-Match conditional PATCH (the Web API form of ``SetState``):

* claim: Pending Send -> Sending; back to Pending Send after a transient failure;
* done: Sending -> Sent. Server-Side Synchronization itself moves a sent email to Sent "through a 'SetState'
  operation" (SupportArticles-docs ``sssadminprod.md``, scenario 1), and email's status options carry no
  transition rules (``TransitionData: None``), so the router does exactly what SSS does. The email is never
  re-opened: an Open (Draft) copy of a mail Exchange already sent would be editable and sendable a second time.
  ``senton`` ("Date Sent") is read-only and filled by the platform; ``messageid`` is documented as "Used only for
  email that is received", and ``deliveryattempts`` is not writable on a Completed email, so both stay in the
  router's outbound ledger (``emailrouter`` shows them);
* Failed {0,8} is Open (editable, crm-ref §11): the status first, then ``deliveryattempts``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from core.domain.model import CrmRecordRef, Importance
from core.domain.outbound import CrmOutboundEmail, OutboundAttachment, OutboundParty, OutboundStatus
from core.domain.parties import ParticipationType

if TYPE_CHECKING:
    from core.adapters.dataverse import DataverseClient

__all__ = [
    "ClaimLost",
    "CrmEmailState",
    "CrmRejected",
    "CrmUnavailable",
    "DataverseOutboundCrm",
    "EmailGone",
    "LoadedEmail",
    "OutboundCrmError",
    "OutboundCrmGateway",
]

log = logging.getLogger("emailrouter.outbound.crm")

_T = TypeVar("_T")

# The address column of each table a party can point at (dv-ref §4.2).
_ADDRESS_COLUMN: Final[dict[str, str]] = {
    "systemuser": "internalemailaddress",
    "queue": "emailaddress",
    "contact": "emailaddress1",
    "account": "emailaddress1",
    "lead": "emailaddress1",
}
_FORMATTED: Final = "@OData.Community.Display.V1.FormattedValue"
_LOGICAL: Final = "@Microsoft.Dynamics.CRM.lookuplogicalname"
_STATE_COLUMNS: Final = ("activityid", "statecode", "statuscode", "deliveryattempts", "modifiedon", "messageid",
                         "_emailsender_value", "_sendermailboxid_value")


# ------------------------------------------------------------------------------------------------ values and errors


@dataclass(frozen=True, slots=True)
class CrmEmailState:
    """Where a CRM email stands, with the ETag that version carries (for If-Match)."""

    activity_id: uuid.UUID
    statecode: int
    statuscode: int
    etag: str
    delivery_attempts: int = 0
    modified_on: datetime | None = None
    sender: CrmRecordRef | None = None  # _emailsender_value (systemuser or queue for outgoing email)
    sender_mailbox_id: uuid.UUID | None = None  # _sendermailboxid_value
    message_id: str | None = None

    @property
    def status(self) -> OutboundStatus | None:
        """The outbound status this state/status pair is, or None (Draft, Completed, Received, Canceled)."""
        pair = (self.statecode, self.statuscode)
        return next((s for s in OutboundStatus if s.crm == pair), None)


@dataclass(frozen=True, slots=True)
class LoadedEmail:
    state: CrmEmailState
    email: CrmOutboundEmail  # attachments without content: the service loads what it needs
    parent_id: uuid.UUID | None = None  # _parentactivityid_value (a reply composed in CRM)


class OutboundCrmError(Exception):
    """Base of the gateway's errors. ``reason`` is safe to show an admin (no bodies, no tokens)."""

    def __init__(self, reason: str, *, code: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ClaimLost(OutboundCrmError):
    """The If-Match ETag no longer matched: another worker claimed or someone changed the email."""


class EmailGone(OutboundCrmError):
    """The email (or an attachment of it) no longer exists."""


class CrmUnavailable(OutboundCrmError):
    """Throttled, 5xx, timeout, expired token: try again later (``retry_after`` seconds when Dataverse said)."""

    def __init__(self, reason: str, *, code: str = "", retry_after: float | None = None) -> None:
        super().__init__(reason, code=code)
        self.retry_after = retry_after


class CrmRejected(OutboundCrmError):
    """Dataverse refused the request for good (bad request, missing privilege, attachment too large)."""


class OutboundCrmGateway(Protocol):
    """Everything the outbound pipeline asks of CRM."""

    def list_pending(self, *, max_rows: int) -> AsyncIterator[CrmEmailState]:
        """Emails in Pending Send {1,6}, oldest first, paged; at most ``max_rows``."""
        ...

    def list_sending(self, *, max_rows: int) -> AsyncIterator[CrmEmailState]:
        """Emails in Sending {1,7} (for the reaper), oldest first; at most ``max_rows``."""
        ...

    async def get_state(self, email_id: uuid.UUID) -> CrmEmailState | None: ...

    async def load(self, email_id: uuid.UUID) -> LoadedEmail | None:
        """Subject, body, importance, parties (with addresses) and attachment metadata; None if gone."""
        ...

    async def load_attachment(self, attachment_id: uuid.UUID) -> bytes: ...

    async def set_status(self, email_id: uuid.UUID, status: OutboundStatus, *, etag: str | None) -> str | None:
        """Status-only change (claim: Pending Send -> Sending with ``etag``; back to Pending Send). Returns the
        new ETag. :class:`ClaimLost` when ``etag`` no longer matches."""
        ...

    async def mark_sent(self, email_id: uuid.UUID) -> None:
        """Sent {1,3}, status only (the email is never re-opened); idempotent (already Sent = done)."""
        ...

    async def mark_failed(self, email_id: uuid.UUID, *, delivery_attempts: int) -> None:
        """Failed {0,8} with deliveryattempts; idempotent."""
        ...


# ------------------------------------------------------------------------------------------------ parsing (pure)


def _uuid(value: object) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _when(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _int(value: object, default: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return default
    try:
        return int(value)
    except ValueError:
        return default


def _lookup(row: dict[str, Any], column: str) -> CrmRecordRef | None:
    rid = _uuid(row.get(f"_{column}_value"))
    table = row.get(f"_{column}_value{_LOGICAL}")
    if rid is None or not isinstance(table, str) or not table:
        return None
    return CrmRecordRef(table, rid)


def parse_state(row: dict[str, Any]) -> CrmEmailState:
    """A :class:`CrmEmailState` from an ``emails`` row (needs the lookuplogicalname annotation for the sender)."""
    activity_id = _uuid(row.get("activityid"))
    if activity_id is None:
        raise ValueError("email row without activityid")
    return CrmEmailState(
        activity_id=activity_id,
        statecode=_int(row.get("statecode"), -1),
        statuscode=_int(row.get("statuscode"), -1),
        etag=str(row.get("@odata.etag") or ""),
        delivery_attempts=_int(row.get("deliveryattempts")),
        modified_on=_when(row.get("modifiedon")),
        sender=_lookup(row, "emailsender"),
        sender_mailbox_id=_uuid(row.get("_sendermailboxid_value")),
        message_id=row.get("messageid") or None,
    )


def _importance(prioritycode: object) -> Importance:
    # email.prioritycode 0 Low, 1 Normal, 2 High (dv-ref §2.1)
    return {0: Importance.LOW, 2: Importance.HIGH}.get(_int(prioritycode, 1), Importance.NORMAL)


def parse_party(row: dict[str, Any], record_address: str | None = None) -> OutboundParty | None:
    """An activityparty row -> :class:`OutboundParty` (``addressused`` wins, else the record's address)."""
    try:
        mask = ParticipationType(_int(row.get("participationtypemask"), -1))
    except ValueError:
        return None  # Regarding/Owner rows etc.: not part of the message
    record = _lookup(row, "partyid")
    address = row.get("addressused") or record_address or None
    name = row.get(f"_partyid_value{_FORMATTED}") or row.get("unresolvedpartyname") or ""
    return OutboundParty(mask=mask, record=record, address=address, name=str(name))


def parse_attachment(row: dict[str, Any], body_html: str) -> OutboundAttachment | None:
    attachment_id = _uuid(row.get("activitymimeattachmentid"))
    if attachment_id is None:
        return None
    content_id = row.get("attachmentcontentid") or None
    # CRM has no "inline" flag: an attachment the HTML body references by cid: is inline.
    is_inline = bool(content_id) and f"cid:{content_id}" in body_html
    return OutboundAttachment(
        attachment_id=attachment_id,
        filename=str(row.get("filename") or "attachment"),
        mimetype=str(row.get("mimetype") or "application/octet-stream"),
        size=_int(row.get("filesize")),
        content=None,
        content_id=content_id,
        is_inline=is_inline,
    )


# ------------------------------------------------------------------------------------------------ Dataverse


class DataverseOutboundCrm:
    """:class:`OutboundCrmGateway` over :class:`core.adapters.dataverse.DataverseClient`."""

    def __init__(self, client: DataverseClient, *, page_size: int = 1000) -> None:
        self._dv = client
        self._page_size = max(1, min(5000, page_size))

    async def _call(self, what: str, make: Callable[[], Awaitable[_T]]) -> _T:
        """Run one Dataverse call, translating its typed errors into the gateway's four."""
        from core.adapters.dataverse import (
            AuthError,
            DataverseError,
            NotFoundError,
            PreconditionFailedError,
            ThrottledError,
            TransientError,
        )

        try:
            return await make()
        except PreconditionFailedError as exc:
            raise ClaimLost(f"{what}: the email changed (ETag mismatch)", code=exc.code) from exc
        except NotFoundError as exc:
            raise EmailGone(f"{what}: not found", code=exc.code) from exc
        except (ThrottledError, TransientError) as exc:
            raise CrmUnavailable(f"{what}: Dataverse {exc.status or 'network'} {exc.code}".rstrip(),
                                 code=exc.code, retry_after=exc.retry_after) from exc
        except AuthError as exc:
            if exc.retryable:
                raise CrmUnavailable(f"{what}: Dataverse 401 (token)", code=exc.code) from exc
            raise CrmRejected(f"{what}: Dataverse {exc.status} {exc.code} {exc.message[:200]}",
                              code=exc.code) from exc
        except DataverseError as exc:
            raise CrmRejected(f"{what}: Dataverse {exc.status} {exc.code} {exc.message[:200]}",
                              code=exc.code) from exc

    async def _list(self, statuscode: int, max_rows: int) -> AsyncIterator[CrmEmailState]:
        from core.adapters.odata import and_, eq

        rows = self._dv.list(
            "emails", select=_STATE_COLUMNS, filter=and_(eq("statecode", 1), eq("statuscode", statuscode)),
            orderby="modifiedon asc", page_size=min(self._page_size, max_rows), top=max_rows,
            annotations="Microsoft.Dynamics.CRM.lookuplogicalname",
        )
        iterator = rows.__aiter__()
        while True:
            try:
                row = await self._call("list emails", iterator.__anext__)
            except StopAsyncIteration:
                return
            try:
                yield parse_state(row)
            except ValueError:
                log.warning("outbound: skipped an email row without activityid")

    def list_pending(self, *, max_rows: int) -> AsyncIterator[CrmEmailState]:
        return self._list(OutboundStatus.PENDING_SEND.crm[1], max_rows)

    def list_sending(self, *, max_rows: int) -> AsyncIterator[CrmEmailState]:
        return self._list(OutboundStatus.SENDING.crm[1], max_rows)

    async def get_state(self, email_id: uuid.UUID) -> CrmEmailState | None:
        try:
            row = await self._call("get email", lambda: self._dv.get(
                "emails", email_id, select=_STATE_COLUMNS, annotations="Microsoft.Dynamics.CRM.lookuplogicalname"))
        except EmailGone:
            return None
        return parse_state(row)

    async def load(self, email_id: uuid.UUID) -> LoadedEmail | None:
        select = (*_STATE_COLUMNS, "subject", "description", "prioritycode", "trackingtoken", "inreplyto",
                  "_parentactivityid_value")
        expand = (
            "email_activity_parties($select=participationtypemask,addressused,_partyid_value,unresolvedpartyname)",
            "email_activity_mime_attachment($select=activitymimeattachmentid,filename,mimetype,filesize,"
            "attachmentcontentid)",
        )
        try:
            row = await self._call("load email", lambda: self._dv.get(
                "emails", email_id, select=select, expand=expand, annotations="*"))
        except EmailGone:
            return None
        state = parse_state(row)
        body = str(row.get("description") or "")
        parties: list[OutboundParty] = []
        for party_row in row.get("email_activity_parties") or []:
            address = None
            if not party_row.get("addressused"):
                address = await self._record_address(_lookup(party_row, "partyid"))
            party = parse_party(party_row, address)
            if party is not None:
                parties.append(party)
        attachments = [a for a in (parse_attachment(r, body) for r in row.get("email_activity_mime_attachment") or [])
                       if a is not None]
        in_reply_to = row.get("inreplyto") or None
        parent_id = _uuid(row.get("_parentactivityid_value"))
        if not in_reply_to and parent_id is not None:
            # A reply composed in CRM: thread it under the parent's Message-ID (crm-ref §6 correlation). A parent
            # the router sent has none in CRM (messageid is for received email): the service asks its ledger.
            parent = await self.get_state(parent_id)
            in_reply_to = parent.message_id if parent else None
        email = CrmOutboundEmail(
            activity_id=state.activity_id,
            subject=str(row.get("subject") or ""),
            description_html=body,
            parties=tuple(parties),
            attachments=tuple(attachments),
            importance=_importance(row.get("prioritycode")),
            tracking_token=row.get("trackingtoken") or None,
            in_reply_to=in_reply_to,
        )
        return LoadedEmail(state, email, parent_id)

    async def _record_address(self, ref: CrmRecordRef | None) -> str | None:
        """The primary address of a resolved party whose row carries no ``addressused``."""
        if ref is None or ref.table not in _ADDRESS_COLUMN:
            return None
        column = _ADDRESS_COLUMN[ref.table]
        try:
            row = await self._call("get party address", lambda: self._dv.get(ref.entity_set, ref.id, select=[column]))
        except EmailGone:
            return None
        value = row.get(column)
        return str(value) if value else None

    async def load_attachment(self, attachment_id: uuid.UUID) -> bytes:
        row = await self._call("load attachment", lambda: self._dv.get(
            "activitymimeattachments", attachment_id, select=["body"]))
        try:
            return base64.b64decode(str(row.get("body") or ""), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CrmRejected(f"attachment {attachment_id} has a body that is not base64") from exc

    async def _patch(self, what: str, email_id: uuid.UUID, body: dict[str, Any], *, if_match: str | None,
                     return_etag: bool = False) -> str | None:
        return await self._call(what, lambda: self._dv.update(
            "emails", email_id, body, if_match=if_match, return_etag=return_etag))

    async def set_status(self, email_id: uuid.UUID, status: OutboundStatus, *, etag: str | None) -> str | None:
        state, code = status.crm
        return await self._patch(f"set email {status.value}", email_id, {"statecode": state, "statuscode": code},
                                 if_match=etag, return_etag=True)

    async def mark_sent(self, email_id: uuid.UUID) -> None:
        """Sent {1,3} by a status-only conditional PATCH from wherever the email stands (normally Sending; Pending
        Send when the reaper returned it meanwhile; Open only if someone re-opened it after the send, which this
        closes). Idempotent: already Sent = done. An ETag mismatch means the email changed between our read and
        our write; the mail left Exchange all the same, so re-read and converge to Sent rather than give up."""
        state, code = OutboundStatus.SENT.crm
        for _ in range(3):
            current = await self.get_state(email_id)
            if current is None:
                raise EmailGone("mark Sent: the email no longer exists")
            if current.status is OutboundStatus.SENT:
                return
            try:
                await self._patch("mark Sent", email_id, {"statecode": state, "statuscode": code},
                                  if_match=current.etag)
                return
            except ClaimLost:
                continue
        raise CrmUnavailable("mark Sent: the email kept changing; will retry")

    async def mark_failed(self, email_id: uuid.UUID, *, delivery_attempts: int) -> None:
        current = await self.get_state(email_id)
        if current is None:
            raise EmailGone("mark Failed: the email no longer exists")
        if current.status is OutboundStatus.SENT:
            return  # never turn a sent email into a failed one
        if current.status is not OutboundStatus.FAILED:
            state, code = OutboundStatus.FAILED.crm
            await self._patch("mark Failed", email_id, {"statecode": state, "statuscode": code},
                              if_match=current.etag)
        # Failed is Open (editable): now the attempt count can be written.
        await self._patch("record delivery attempts", email_id, {"deliveryattempts": max(0, delivery_attempts)},
                          if_match="*")
