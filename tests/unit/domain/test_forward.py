from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from core.domain.forward import NotUnwrapped, UnwrapCode, Unwrapped, unwrap_forwarded
from core.domain.model import (
    Attachment,
    Folder,
    FolderKind,
    Headers,
    InboundMethod,
    MailboxConfig,
    MailboxKind,
    WrapperTrustPolicy,
)

from .factories import NOW, addr, message, user_mailbox

SINK = MailboxConfig(address="crm-sink@contoso.com", kind=MailboxKind.FORWARD_SINK, delete_after_processing=True)
DAVE = user_mailbox(address="dave@contoso.com", inbound_method=InboundMethod.FORWARD,
                    forward_sink_address="crm-sink@contoso.com")
FORWARD_USERS = {
    "dave@contoso.com": DAVE,
    "erin@contoso.com": replace(DAVE, address="erin@contoso.com", forward_sink_address="other-sink@contoso.com"),
    "frank@contoso.com": replace(DAVE, address="frank@contoso.com", inbound_method=InboundMethod.INDIVIDUAL),
    "gina@contoso.com": replace(DAVE, address="gina@contoso.com", enabled_for_incoming=False),
}
ORIGINAL = message(mailbox="crm-sink@contoso.com", graph_id="", folder=Folder(FolderKind.OTHER),
                   internet_message_id="<orig@fabrikam.com>", received_at=None, to=(addr("dave@contoso.com"),))
INTERNAL = ("X-MS-Exchange-Organization-AuthAs", "Internal")


def wrapper(**overrides: Any) -> Any:
    values: dict[str, Any] = {
        "mailbox": "crm-sink@contoso.com", "graph_id": "wrap-1", "internet_message_id": "<wrap@contoso.com>",
        "subject": "FW: Order", "from_": addr("dave@contoso.com"), "sender": addr("dave@contoso.com"),
        "to": (addr("crm-sink@contoso.com"),), "headers": [INTERNAL],
        "attachments": (Attachment("Order", "message/rfc822", 100, item=ORIGINAL),),
    }
    values.update(overrides)
    return message(**values)


def test_unwraps_for_the_forwarding_user() -> None:
    result = unwrap_forwarded(wrapper(), SINK, FORWARD_USERS)
    assert isinstance(result, Unwrapped)
    assert result.tracking_mailbox is DAVE
    assert result.wrapper_graph_id == "wrap-1"
    assert result.original.internet_message_id == "<orig@fabrikam.com>"
    assert result.original.mailbox == "dave@contoso.com"
    assert result.original.folder.kind is FolderKind.INBOX
    assert result.original.received_at == NOW  # taken from the wrapper


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"folder": Folder(FolderKind.JUNK, "j")}, UnwrapCode.NOT_IN_INBOX),
        ({"from_": None, "sender": None}, UnwrapCode.NO_SENDER),
        # spoofed: From claims a forward user, Sender says otherwise
        ({"sender": addr("mallory@evil.example")}, UnwrapCode.SPOOFED),
        # spoofed: arrived from outside the tenant (Anonymous) or without the org header at all
        ({"headers": [("X-MS-Exchange-Organization-AuthAs", "Anonymous")]}, UnwrapCode.EXTERNAL),
        ({"headers": []}, UnwrapCode.EXTERNAL),
        # spoofed: authentication verdict fails
        ({"headers": [INTERNAL, ("Authentication-Results", "spf=pass; dmarc=fail action=none")]},
         UnwrapCode.SPOOFED),
        ({"from_": addr("stranger@fabrikam.com"), "sender": None}, UnwrapCode.STRANGER),
        ({"from_": addr("frank@contoso.com"), "sender": None}, UnwrapCode.NOT_FORWARD_USER),
        ({"from_": addr("erin@contoso.com"), "sender": None}, UnwrapCode.WRONG_SINK),
        ({"from_": addr("gina@contoso.com"), "sender": None}, UnwrapCode.USER_DISABLED),
        # plain mail in the sink, or two attached messages
        ({"attachments": (Attachment("a.pdf", "application/pdf", 3, content=b"pdf"),)}, UnwrapCode.NO_ORIGINAL),
        ({"attachments": ()}, UnwrapCode.NO_ORIGINAL),
        ({"attachments": (Attachment("1", "message/rfc822", 1, item=ORIGINAL),
                          Attachment("2", "message/rfc822", 1, item=ORIGINAL))}, UnwrapCode.MULTIPLE_ORIGINALS),
    ],
)
def test_untrusted_or_unusable_wrappers_are_not_tracked(overrides: dict[str, Any], code: UnwrapCode) -> None:
    result = unwrap_forwarded(wrapper(**overrides), SINK, FORWARD_USERS)
    assert isinstance(result, NotUnwrapped)
    assert result.code is code and result.why


def test_only_sinks_unwrap() -> None:
    result = unwrap_forwarded(wrapper(), DAVE, FORWARD_USERS)
    assert isinstance(result, NotUnwrapped) and result.code is UnwrapCode.NOT_A_SINK


def test_trust_header_names_are_configurable_and_the_check_can_be_off() -> None:
    custom = WrapperTrustPolicy(auth_as_header="X-Test-Auth", internal_auth_values=frozenset({"ok"}))
    assert isinstance(unwrap_forwarded(wrapper(headers=[("x-test-auth", "OK")]), SINK, FORWARD_USERS, trust=custom),
                      Unwrapped)
    off = WrapperTrustPolicy(require_internal_auth=False)
    assert isinstance(unwrap_forwarded(wrapper(headers=[]), SINK, FORWARD_USERS, trust=off), Unwrapped)
    assert Headers(((INTERNAL),)).get("x-ms-exchange-organization-authas") == "Internal"
