"""Forward-mailbox unwrap (crm-ref §3, issue 5 "Forward mailbox unwrap").

A user whose incoming method is Forward Mailbox has an Exchange rule that sends each message **as an attachment**
to one sink mailbox. In the sink, the wrapper's sender is the forwarding user and the original is the item
attachment (or a ``message/rfc822`` file, normalised to the same shape).

Trust rule (the sink is a public address: anyone can mail it, so the wrapper's From proves nothing by itself):

1. the wrapper is in the sink's Inbox;
2. From and Sender agree (a differing Sender = sent on behalf / spoofed display);
3. the wrapper was submitted inside the tenant: ``X-MS-Exchange-Organization-AuthAs`` is ``Internal`` (Exchange
   stamps it on mail a tenant mailbox submits, including inbox-rule forwards, and strips organisation headers from
   mail arriving from outside) - header names configurable in :class:`WrapperTrustPolicy`, NOT VERIFIED on a live
   tenant;
4. no ``Authentication-Results`` verdict fails (spf/dkim/dmarc/compauth=fail);
5. the From address is a mailbox configured for inbound Forward to THIS sink, enabled for incoming email;
6. exactly one attached message.

Anything else is not tracked and reported with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from core.domain.model import (
    Folder,
    FolderKind,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    MailMessage,
    WrapperTrustPolicy,
)

__all__ = ["NotUnwrapped", "UnwrapCode", "UnwrapResult", "Unwrapped", "WrapperFate", "unwrap_forwarded",
           "wrapper_fate"]


class UnwrapCode(StrEnum):
    NOT_A_SINK = "not_a_sink"
    NOT_IN_INBOX = "not_in_inbox"
    NO_SENDER = "no_sender"
    SPOOFED = "spoofed"
    EXTERNAL = "external"
    STRANGER = "stranger"
    NOT_FORWARD_USER = "not_forward_user"
    WRONG_SINK = "wrong_sink"
    USER_DISABLED = "user_disabled"
    NO_ORIGINAL = "no_original"
    MULTIPLE_ORIGINALS = "multiple_originals"


@dataclass(frozen=True, slots=True)
class Unwrapped:
    original: MailMessage  # re-homed: mailbox = the forwarding user's address, folder = Inbox
    tracking_mailbox: MailboxConfig  # the forwarding user's mailbox config
    wrapper_graph_id: str


@dataclass(frozen=True, slots=True)
class NotUnwrapped:
    code: UnwrapCode
    why: str


UnwrapResult = Unwrapped | NotUnwrapped


def _failing_verdict(wrapper: MailMessage, policy: WrapperTrustPolicy) -> str | None:
    for value in wrapper.headers.get_all(policy.authentication_results_header):
        lowered = " ".join(value.lower().split())
        for verdict in policy.failing_verdicts:
            if verdict in lowered:
                return verdict
    return None


def unwrap_forwarded(wrapper: MailMessage, sink: MailboxConfig, forward_users: Mapping[str, MailboxConfig], *,
                     trust: WrapperTrustPolicy | None = None) -> UnwrapResult:
    """``forward_users`` = address -> mailbox config of users (and queues) whose incoming method is Forward."""
    policy = trust or WrapperTrustPolicy()
    if sink.kind is not MailboxKind.FORWARD_SINK:
        return NotUnwrapped(UnwrapCode.NOT_A_SINK, f"{sink.address} is not a forward mailbox")
    if wrapper.folder.kind is not FolderKind.INBOX:
        return NotUnwrapped(UnwrapCode.NOT_IN_INBOX, "only wrappers in the sink's Inbox are processed")
    origin = wrapper.from_
    if origin is None:
        return NotUnwrapped(UnwrapCode.NO_SENDER, "the wrapper has no From address")
    if wrapper.sender is not None and wrapper.sender.address != origin.address:
        return NotUnwrapped(UnwrapCode.SPOOFED,
                            f"wrapper From {origin.address} differs from Sender {wrapper.sender.address}")
    if policy.require_internal_auth:
        auth_as = (wrapper.headers.get(policy.auth_as_header) or "").strip().lower()
        if auth_as not in policy.internal_auth_values:
            shown = auth_as or "missing"
            return NotUnwrapped(UnwrapCode.EXTERNAL,
                                f"wrapper was not submitted inside the tenant ({policy.auth_as_header}: {shown})")
    verdict = _failing_verdict(wrapper, policy)
    if verdict is not None:
        return NotUnwrapped(UnwrapCode.SPOOFED, f"wrapper failed sender authentication ({verdict})")

    user = forward_users.get(origin.address)
    if user is None:
        return NotUnwrapped(UnwrapCode.STRANGER, f"{origin.address} is not a forward-mailbox user")
    if user.inbound_method is not InboundMethod.FORWARD:
        return NotUnwrapped(UnwrapCode.NOT_FORWARD_USER,
                            f"{origin.address} has incoming method {user.inbound_method.name}, not Forward")
    if user.forward_sink_address != sink.address:
        return NotUnwrapped(UnwrapCode.WRONG_SINK,
                            f"{origin.address} forwards to {user.forward_sink_address}, not {sink.address}")
    if not user.enabled_for_incoming:
        return NotUnwrapped(UnwrapCode.USER_DISABLED, f"{origin.address} is not enabled for incoming email")

    items = [a.item for a in wrapper.attachments if a.item is not None]
    if not items:
        return NotUnwrapped(UnwrapCode.NO_ORIGINAL, "plain mail in the sink: no message attached")
    if len(items) > 1:
        return NotUnwrapped(UnwrapCode.MULTIPLE_ORIGINALS,
                            f"{len(items)} messages attached; a forward rule attaches exactly one")
    original = items[0]
    # The original is processed as if it were in the user's Inbox; an item without its own received time takes the
    # wrapper's (the rule forwards on delivery, so the two are seconds apart).
    rehomed = replace(
        original,
        mailbox=user.address,
        folder=Folder(FolderKind.INBOX, ""),
        received_at=original.received_at or wrapper.received_at,
        truncations=original.truncations + wrapper.truncations,
    )
    return Unwrapped(rehomed, user, wrapper.graph_id)


class WrapperFate(StrEnum):
    KEEP = "keep"
    DELETE = "delete"
    PROCESSED = "processed"  # moved to the processed folder
    UNDELIVERABLE = "undeliverable"  # moved to the undeliverable folder


def wrapper_fate(*, delivered: bool, delete_after_processing: bool, processed_folder: str,
                 undeliverable_folder: str) -> tuple[WrapperFate, str]:
    """What happens to a wrapper in a forward mailbox once it has been decided, and the folder it goes to. Pure.

    ``delivered``: the router decided it for a forwarding user (tracked, already in CRM, or not tracked by a skip
    rule or that user's filter) - a processed wrapper, tracked or not: deleted when the sink deletes processed mail
    (``DeleteAfterProcessing``, CRM's ``processanddeleteemails``), else moved to the processed folder (the CRM 2011
    Router kept forward mailboxes from filling up the same way). Not delivered: nobody it can be tracked for (not a
    forward, not trusted, an unknown forwarder) or it failed for good - moved to the undeliverable folder (SSS's
    ``moveundeliveredemails``), never deleted. An empty folder name leaves the wrapper where it is."""
    if delivered:
        if delete_after_processing:
            return WrapperFate.DELETE, ""
        return (WrapperFate.PROCESSED, processed_folder) if processed_folder else (WrapperFate.KEEP, "")
    return (WrapperFate.UNDELIVERABLE, undeliverable_folder) if undeliverable_folder else (WrapperFate.KEEP, "")
