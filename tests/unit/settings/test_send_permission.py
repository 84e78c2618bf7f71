"""Mail.Send in the health probe (audit graph-fidelity #5): with Exchange RBAC for Applications the token has no
Mail.* roles, so an absent role is unknown, not a failure; the router's own sends decide."""

from __future__ import annotations

from datetime import UTC, datetime

from core.settings.health import send_permission

T1 = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
T2 = datetime(2030, 1, 1, 10, 0, tzinfo=UTC)


def test_token_role_grants() -> None:
    assert send_permission(frozenset({"Mail.Send", "Mail.ReadWrite"}), None).ok


def test_absent_role_is_unknown_not_failing() -> None:
    verdict = send_permission(frozenset(), None)
    assert verdict.ok and "not proven" in verdict.detail
    assert send_permission(None, {}).ok


def test_a_send_proves_it_and_a_later_403_disproves_it() -> None:
    sent = {"LastOutboundSentAt": T1}
    assert send_permission(frozenset(), sent).ok and "proven" in send_permission(frozenset(), sent).detail
    refused = {**sent, "LastOutboundError": "the app may not send as this mailbox (403) (Graph 403 ErrorAccessDenied)",
               "LastOutboundErrorAt": T2.isoformat().replace("+00:00", "Z")}
    verdict = send_permission(frozenset(), refused)
    assert not verdict.ok and "refused" in verdict.detail
    recovered = {**refused, "LastOutboundSentAt": datetime(2030, 1, 1, 11, 0, tzinfo=UTC)}
    assert send_permission(frozenset(), recovered).ok
    other_error = {**sent, "LastOutboundError": "message too large (Graph 413 x)", "LastOutboundErrorAt": T2}
    assert send_permission(frozenset(), other_error).ok
