"""Outbound header injection (issue 10): CR/LF/NUL/controls/Unicode line separators anywhere a header is made
from CRM data are refused by build_outbound_message; clean but tricky values (RFC 2047 look-alikes, quotes,
commas, angle brackets in names) are built, and when the Graph message is rendered to MIME (the Graph emulator's
build_mime, as Exchange would) and parsed back, no header or recipient appears that the CRM email did not have.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.domain.model import ApprovalStatus, CrmRecordRef, CrmTable, MailboxConfig, MailboxKind, OrgEmailSettings
from core.domain.model import OutboundMethod as Method
from core.domain.outbound import (
    CrmOutboundEmail,
    OutboundAttachment,
    OutboundMessage,
    OutboundParty,
    OutboundRejected,
    RejectCode,
    build_outbound_message,
)
from core.domain.parties import ParticipationType as P
from emulators.graph.mime import build_mime, parse_message

ALICE = CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=1))
CAROL = CrmRecordRef(CrmTable.CONTACT, uuid.UUID(int=100))
SENDER = MailboxConfig(address="alice@contoso.example", kind=MailboxKind.USER, owner=ALICE,
                       outbound_method=Method.ROUTER, approval=ApprovalStatus.APPROVED)
ORG = OrgEmailSettings(allow_unresolved_parties_on_send=True)
FORBIDDEN = [chr(c) for c in range(0x20)] + ["\x7f", "\x85", "\u2028", "\u2029"]


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def email(**overrides: Any) -> CrmOutboundEmail:
    values: dict[str, Any] = {
        "activity_id": uuid.UUID(int=77),
        "subject": "Order 1234",
        "description_html": "<p>Hello</p>",
        "parties": (OutboundParty(P.SENDER, ALICE, "alice@contoso.example", "Alice"),
                    OutboundParty(P.TO, CAROL, "carol@fabrikam.example", "Carol Jones")),
        "tracking_token": "CRM:0001001",
    }
    values.update(overrides)
    return CrmOutboundEmail(**values)


def to(address: str, name: str = "", mask: P = P.TO) -> tuple[OutboundParty, ...]:
    return (OutboundParty(P.SENDER, ALICE, "alice@contoso.example", "Alice"), OutboundParty(mask, CAROL, address, name))


def injected(value: str, ch: str, where: str) -> str:
    return {"start": ch + value, "middle": value[:3] + ch + value[3:], "end": value + ch,
            "header": value + ch + "Bcc: evil@evil.example" + ch}[where]


def _vectors() -> list[tuple[str, Any]]:
    """(field, value-builder) pairs covering every header the builder writes from CRM data."""
    return [
        ("subject", lambda v: email(subject=v)),
        ("tracking token", lambda v: email(tracking_token=v)),
        ("recipient name", lambda v: email(parties=to("carol@fabrikam.example", v))),
        ("cc name", lambda v: email(parties=to("carol@fabrikam.example", v, P.CC))),
        ("bcc address", lambda v: email(parties=to(v.replace(" ", "") + "@fabrikam.example", "", P.BCC))),
        ("recipient address", lambda v: email(parties=to(v.replace(" ", "") + "@fabrikam.example"))),
        ("in-reply-to", lambda v: email(in_reply_to=f"<{v}@x.example>")),
        ("references", lambda v: email(in_reply_to="<a@x.example>", references=(f"<{v}@x.example>",))),
        ("attachment name", lambda v: email(attachments=(OutboundAttachment(uuid.UUID(int=5), v, "text/plain", 1,
                                                                            b"x"),))),
        ("attachment type", lambda v: email(attachments=(OutboundAttachment(uuid.UUID(int=5), "a.txt", v, 1,
                                                                            b"x"),))),
    ]


VECTORS = _vectors()


@pytest.mark.parametrize("ch", FORBIDDEN, ids=[f"U+{ord(c):04X}" for c in FORBIDDEN])
@pytest.mark.parametrize(("field", "make"), VECTORS, ids=[v[0] for v in VECTORS])
def test_every_control_and_line_separator_is_refused_everywhere(field: str, make: Any, ch: str) -> None:
    for where in ("start", "middle", "end", "header"):
        result = build_outbound_message(make(injected("abcdef", ch, where)), SENDER, ORG)
        if isinstance(result, OutboundMessage):
            # Only acceptable when the character was trimmed away (an address is strip()ped before it is checked):
            # nothing forbidden may reach the message.
            assert field.endswith("address") and where == "start", (field, where)
            assert_no_forbidden(result)
            continue
        assert result.code in (RejectCode.HEADER_INJECTION, RejectCode.INVALID_ADDRESS), (field, where, result)
        assert result.why


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k not in ("contentBytes", "content") for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def assert_no_forbidden(built: OutboundMessage) -> None:
    for text in _strings(built.graph_message):
        assert not any(ch in text for ch in FORBIDDEN), f"forbidden character reached the message: {text!r}"
    for large in built.large_attachments:
        assert not any(ch in large.name + large.content_type for ch in FORBIDDEN)


@pytest.mark.slow
def test_generated_injection_attempts_are_refused() -> None:
    runs = 0
    text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)

    @fuzz_settings(1500)
    @given(prefix=text, suffix=text, ch=st.sampled_from(FORBIDDEN), vector=st.sampled_from(VECTORS))
    def run(prefix: str, suffix: str, ch: str, vector: tuple[str, Any]) -> None:
        nonlocal runs
        runs += 1
        result = build_outbound_message(vector[1](prefix + ch + suffix), SENDER, ORG)
        if isinstance(result, OutboundMessage):  # trimmed away (addresses are strip()ped): must leave no trace
            assert_no_forbidden(result)
            return
        # An address may be refused as invalid first; the value never reaches a message either way.
        assert result.code in (RejectCode.HEADER_INJECTION, RejectCode.INVALID_ADDRESS), (vector[0], result)

    run()
    assert runs >= 1500


# ------------------------------------------------------------------------------------------ clean but tricky

# Encoded words whose DECODED text carries a line break (+ a header): no control character in the literal value.
RFC2047_LINE_BREAKS = [
    "=?utf-8?q?a=0D=0ABcc:_evil@evil.example?=",
    "=?utf-8?b?eA0KQmNjOiBldmlsQGV2aWwuZXhhbXBsZQ==?=",
    "=?iso-8859-1?q?=0A=0DX-Injected:_1?= tail",
]
RFC2047_HARMLESS = ["=?utf-8?q??=", "=?bogus?x?y?=", "=?utf-8?q?Bcc:_evil@evil.example?=", "=?utf-8?b?!!?="]
RFC2047_LOOKALIKES = RFC2047_LINE_BREAKS + RFC2047_HARMLESS
TRICKY_NAMES = ['Evil <evil@evil.example>', 'a, b <evil@evil.example>', '"quoted" name', "semi; colon",
                "back\\slash", "(comment) name", "=?utf-8?q?Bcc:_evil@evil.example?="]
EXPECTED_HEADERS = {"from", "to", "cc", "subject", "date", "message-id", "mime-version", "content-type",
                    "content-transfer-encoding", "importance", "x-emailrouter-activityid", "in-reply-to",
                    "references"}


def _render_and_reparse(built: OutboundMessage) -> dict[str, Any]:
    graph = dict(built.graph_message)
    graph["from"] = {"emailAddress": {"address": built.sender_address, "name": "Alice"}}
    extra = [(h["name"], h["value"]) for h in graph.get("internetMessageHeaders", [])]
    raw = build_mime(graph, message_id="<out-1@contoso.example>", date=datetime(2026, 3, 2, tzinfo=UTC),
                     extra_headers=extra)
    return parse_message(raw)


def _addresses(entries: list[dict[str, Any]] | None) -> list[str]:
    return sorted(e["emailAddress"]["address"].lower() for e in entries or [])


def _assert_no_smuggling(built: OutboundMessage | OutboundRejected, recipients: list[str]) -> None:
    assert isinstance(built, OutboundMessage), built
    parsed = _render_and_reparse(built)
    names = {h["name"].lower() for h in parsed["internetMessageHeaders"]}
    assert names <= EXPECTED_HEADERS, f"unexpected headers after rendering: {names - EXPECTED_HEADERS}"
    assert "bcc" not in names
    got = _addresses(parsed["toRecipients"]) + _addresses(parsed["ccRecipients"])
    assert sorted(got) == sorted(recipients), "a recipient was added or lost by a display name or subject"
    assert parsed["bccRecipients"] == []


@pytest.mark.parametrize("subject", RFC2047_HARMLESS)
def test_harmless_rfc2047_lookalike_subjects_stay_inert(subject: str) -> None:
    built = build_outbound_message(email(subject=subject, tracking_token=None), SENDER, ORG)
    assert isinstance(built, OutboundMessage)
    assert built.graph_message["subject"] == subject  # passed literally: never decoded by the router
    _assert_no_smuggling(built, ["carol@fabrikam.example"])


@pytest.mark.parametrize("subject", RFC2047_LINE_BREAKS)
def test_rfc2047_encoded_line_breaks_in_the_subject_are_refused(subject: str) -> None:
    built = build_outbound_message(email(subject=subject, tracking_token=None), SENDER, ORG)
    assert isinstance(built, OutboundRejected) and built.code is RejectCode.HEADER_INJECTION


@pytest.mark.parametrize("subject", RFC2047_LINE_BREAKS)
def test_rfc2047_encoded_line_breaks_do_not_become_headers_when_rendered(subject: str) -> None:
    built = build_outbound_message(email(subject=subject, tracking_token=None), SENDER, ORG)
    if isinstance(built, OutboundRejected):
        return  # refused before rendering: nothing to smuggle
    _assert_no_smuggling(built, ["carol@fabrikam.example"])


@pytest.mark.parametrize("name", TRICKY_NAMES + RFC2047_LOOKALIKES)
def test_tricky_display_names_do_not_add_recipients(name: str) -> None:
    built = build_outbound_message(email(parties=to("carol@fabrikam.example", name)), SENDER, ORG)
    if isinstance(built, OutboundRejected):  # an encoded word hiding a line break is refused outright
        assert built.code is RejectCode.HEADER_INJECTION
        return
    _assert_no_smuggling(built, ["carol@fabrikam.example"])


@pytest.mark.parametrize("address", [
    "=?utf-8?q?evil?=@fabrikam.example",
    "carol@fabrikam.example,evil@evil.example",
                                     "carol@fabrikam.example>evil", '"a b"@fabrikam.example', "a@b@c.example",
                                     "carol@[127.0.0.1]", "carol@fabrikam.example (evil@evil.example)"])
def test_address_smuggling_is_refused_or_inert(address: str) -> None:
    built = build_outbound_message(email(parties=to(address)), SENDER, ORG)
    if isinstance(built, OutboundRejected):
        assert built.code in (RejectCode.INVALID_ADDRESS, RejectCode.HEADER_INJECTION)
        return
    _assert_no_smuggling(built, [address.lower()])


@pytest.mark.slow
def test_generated_clean_values_never_smuggle_headers() -> None:
    runs = 0
    clean = st.text(st.characters(exclude_categories=["Cs", "Cc", "Zl", "Zp"]), max_size=40)

    @fuzz_settings(400)
    @given(subject=clean | st.sampled_from(RFC2047_HARMLESS), name=clean | st.sampled_from(TRICKY_NAMES),
           cc_name=clean)
    def run(subject: str, name: str, cc_name: str) -> None:
        nonlocal runs
        runs += 1
        parties = (*to("carol@fabrikam.example", name),
                   OutboundParty(P.CC, CAROL, "dan@fabrikam.example", cc_name))
        built = build_outbound_message(email(subject=subject, parties=parties), SENDER, ORG)
        if isinstance(built, OutboundRejected):  # a format character (Cf) etc. may be refused: never built
            assert built.code is RejectCode.HEADER_INJECTION
            return
        _assert_no_smuggling(built, ["carol@fabrikam.example", "dan@fabrikam.example"])

    run()
    assert runs >= 400


def test_sender_cannot_be_swapped_through_the_parties() -> None:
    """Injection by data rather than characters: a From party that is not the mailbox owner is refused."""
    mallory = CrmRecordRef(CrmTable.SYSTEMUSER, uuid.UUID(int=666))
    parties = (OutboundParty(P.SENDER, mallory, "alice@contoso.example", "Alice"),
               OutboundParty(P.TO, CAROL, "carol@fabrikam.example"))
    result = build_outbound_message(email(parties=parties), SENDER, ORG)
    assert isinstance(result, OutboundRejected) and result.code is RejectCode.SENDER_MISMATCH
    result = build_outbound_message(email(), replace(SENDER, outbound_method=Method.OUTLOOK), ORG)
    assert isinstance(result, OutboundRejected) and result.code is RejectCode.SENDER_NOT_ROUTER
