from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest

from core.domain.correlation import (
    CorrelationLookup,
    CorrelationMethod,
    KnownEmail,
    correlate,
    correlation_keys,
    find_tracking_tokens,
)
from core.domain.identity import activity_id_for

from .factories import CASE, FABRIKAM_ACCOUNT, LEAD, message, org

ROOT_INDEX = bytes(range(22))
PARENT_INDEX = ROOT_INDEX + b"\x01\x02\x03\x04\x05"
CHILD_INDEX = PARENT_INDEX + b"\x06\x07\x08\x09\x0a"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BY_REPLY = KnownEmail(uuid.UUID(int=1), regarding=CASE)
BY_REFERENCE = KnownEmail(uuid.UUID(int=2), regarding=FABRIKAM_ACCOUNT)
BY_TOKEN = KnownEmail(uuid.UUID(int=3), regarding=LEAD)
BY_INDEX = KnownEmail(uuid.UUID(int=4), regarding=CASE)

LOOKUP = CorrelationLookup(
    by_message_id={"<reply-parent@x>": BY_REPLY, "<ref-old@x>": BY_REFERENCE},
    by_tracking_token={"CRM:0001234": BY_TOKEN},
    by_conversation_index={b64(PARENT_INDEX): BY_INDEX},
)
ALL_SIGNALS: dict[str, Any] = {
    "in_reply_to": "<reply-parent@x>",
    "references": ("<ref-old@x>", "<reply-parent@x>"),
    "subject": "RE: Order CRM:0001234",
    "conversation_index": CHILD_INDEX,
}


@pytest.mark.parametrize(
    ("overrides", "org_overrides", "method", "matched", "parent"),
    [
        # precedence: In-Reply-To > References > token > conversation index
        (ALL_SIGNALS, {}, CorrelationMethod.IN_REPLY_TO, BY_REPLY, BY_REPLY.activity_id),
        # References: newest first
        ({**ALL_SIGNALS, "in_reply_to": "<unknown@x>"}, {}, CorrelationMethod.REFERENCES, BY_REPLY,
         BY_REPLY.activity_id),
        ({**ALL_SIGNALS, "in_reply_to": "<unknown@x>", "references": ("<ref-old@x>", "<unknown2@x>")}, {},
         CorrelationMethod.REFERENCES, BY_REFERENCE, BY_REFERENCE.activity_id),
        ({**ALL_SIGNALS, "in_reply_to": None, "references": ()}, {}, CorrelationMethod.TRACKING_TOKEN, BY_TOKEN,
         None),  # token: regarding copied, no parentactivityid (crm-ref §6.1)
        ({**ALL_SIGNALS, "in_reply_to": None, "references": (), "subject": "RE: Order"}, {},
         CorrelationMethod.CONVERSATION_INDEX, BY_INDEX, BY_INDEX.activity_id),
        ({"subject": "Hello"}, {}, CorrelationMethod.NONE, None, None),
        # org switches
        (ALL_SIGNALS, {"use_correlation": False}, CorrelationMethod.TRACKING_TOKEN, BY_TOKEN, None),
        (ALL_SIGNALS, {"ignore_conversation_index_and_in_reply_to": True}, CorrelationMethod.TRACKING_TOKEN,
         BY_TOKEN, None),
        ({**ALL_SIGNALS, "in_reply_to": None}, {"use_references": False}, CorrelationMethod.TRACKING_TOKEN,
         BY_TOKEN, None),
        ({**ALL_SIGNALS, "in_reply_to": None, "references": ()}, {"use_tracking_token": False},
         CorrelationMethod.CONVERSATION_INDEX, BY_INDEX, BY_INDEX.activity_id),
        ({**ALL_SIGNALS, "subject": "FW: Order CRM:0001234"}, {"do_not_correlate_forwards_as_replies": True},
         CorrelationMethod.TRACKING_TOKEN, BY_TOKEN, None),
        ({**ALL_SIGNALS, "subject": "FW: Order CRM:0001234"}, {}, CorrelationMethod.IN_REPLY_TO, BY_REPLY,
         BY_REPLY.activity_id),
    ],
)
def test_correlation_order_and_switches(overrides: dict[str, Any], org_overrides: dict[str, Any],
                                        method: CorrelationMethod, matched: KnownEmail | None,
                                        parent: uuid.UUID | None) -> None:
    result = correlate(message(**overrides), LOOKUP, org(**org_overrides))
    assert result.method is method
    assert result.matched == matched
    assert result.parent_activity_id == parent
    assert result.regarding == (matched.regarding if matched else None)


def test_correlation_keys_are_all_asked_at_once() -> None:
    refs = tuple(f"<r{i}@x>" for i in range(40))
    keys = correlation_keys(message(in_reply_to="<r39@x>", references=refs, subject="RE: CRM:0001234",
                                    conversation_index=CHILD_INDEX), org())
    assert keys.message_ids[0] == "<r39@x>"
    assert keys.message_ids[1:] == tuple(f"<r{i}@x>" for i in range(38, 7, -1))  # last 32, newest first
    assert keys.tracking_tokens == ("CRM:0001234",)
    assert keys.conversation_indexes == (b64(CHILD_INDEX), b64(PARENT_INDEX), b64(ROOT_INDEX))


def test_conversation_index_of_the_message_itself_is_not_a_parent() -> None:
    m = message(conversation_index=PARENT_INDEX, subject="x")
    self_hit = KnownEmail(activity_id_for(m.internet_message_id or ""))
    lookup = CorrelationLookup({}, {}, {b64(PARENT_INDEX): self_hit, b64(ROOT_INDEX): BY_INDEX})
    result = correlate(m, lookup, org())
    assert result.matched == BY_INDEX


@pytest.mark.parametrize(
    ("subject", "org_overrides", "tokens"),
    [
        ("Order CRM:0001234", {}, ("CRM:0001234",)),
        ("Order crm:0001234", {}, ("CRM:0001234",)),  # prefix re-cased by a user
        ("Order CRM:000123", {}, ()),  # 6 digits: not the default 7-digit token
        ("Order CRM:00012345", {}, ()),  # glued to more digits
        ("Order XCRM:0001234", {}, ()),
        ("RE: a CRM:0001111 b CRM:0002222", {}, ("CRM:0002222", "CRM:0001111")),  # last first
        ("Order CRM:000123", {"tracking_user_digits": 2}, ("CRM:000123",)),
        ("Order D365:00012345", {"tracking_prefixes": ("CRM:", "D365:"), "tracking_counter_digits": 4},
         ("D365:00012345",)),
        ("Order CRM:0001234", {"tracking_prefixes": ()}, ()),
    ],
)
def test_find_tracking_tokens(subject: str, org_overrides: dict[str, Any], tokens: tuple[str, ...]) -> None:
    assert find_tracking_tokens(subject, org(**org_overrides)) == tokens


def test_token_found_is_recorded_even_without_a_match() -> None:
    result = correlate(message(subject="RE: CRM:0009999"), LOOKUP, org())
    assert result.method is CorrelationMethod.NONE and result.tracking_token == "CRM:0009999"


@pytest.mark.parametrize(("method", "code"), [(CorrelationMethod.NONE, 0), (CorrelationMethod.IN_REPLY_TO, 3),
                                              (CorrelationMethod.REFERENCES, 3),
                                              (CorrelationMethod.TRACKING_TOKEN, 4),
                                              (CorrelationMethod.CONVERSATION_INDEX, 5)])
def test_crm_correlationmethod_codes(method: CorrelationMethod, code: int) -> None:
    assert method.crm_code == code
