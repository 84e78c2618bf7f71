"""Pure row parsing, merging and validation of the settings tables."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from core.domain.model import (
    ApprovalStatus,
    InboundMethod,
    MailboxKind,
    OutboundMethod,
    QueueOwnerFallback,
    TrackingFilter,
)
from core.settings.rows import (
    RouterSettings,
    RowError,
    effective_fields,
    parse_mailbox_row,
    parse_org_rows,
    parse_override_changes,
    row_key,
)

UID = "4026be43-6b69-e111-8f65-78e7d1620f5e"


def user_row(**extra: object) -> dict[str, object]:
    return {"PartitionKey": "mailbox", "RowKey": "alice@contoso.example", "Address": "alice@contoso.example",
            "CrmKind": "user", "CrmOwnerId": UID, "CrmInbound": "individual", "CrmOutbound": "router",
            "CrmFilter": "replies_to_crm_email", "CrmApproval": "approved", **extra}


def test_crm_values_become_the_mailbox_config() -> None:
    config = parse_mailbox_row(user_row(CrmProcessEmailFrom="2024-03-01", CrmEnabledOutgoing=False))
    assert not isinstance(config, RowError)
    assert config.kind is MailboxKind.USER
    assert config.owner is not None and config.owner.table == "systemuser" and str(config.owner.id) == UID
    assert config.inbound_method is InboundMethod.INDIVIDUAL
    assert config.outbound_method is OutboundMethod.ROUTER
    assert config.tracking_filter is TrackingFilter.REPLIES_TO_CRM_EMAIL
    assert config.approval is ApprovalStatus.APPROVED
    assert config.process_email_received_after == datetime(2024, 3, 1, tzinfo=UTC)
    assert config.enabled_for_incoming and not config.enabled_for_outgoing


def test_overrides_win_and_numbers_or_aliases_are_accepted() -> None:
    config = parse_mailbox_row(user_row(OverrideInbound="3", OverrideFilter="all", OverrideForwardSink="Sink@X.example",
                                        OverrideOutbound=""))
    assert not isinstance(config, RowError)
    assert config.inbound_method is InboundMethod.FORWARD
    assert config.forward_sink_address == "sink@x.example"
    assert config.tracking_filter is TrackingFilter.ALL
    assert config.outbound_method is OutboundMethod.ROUTER  # empty override = CRM value applies
    values, _ = effective_fields(user_row(OverrideInbound="forward"))
    assert values["Inbound"].source == "override" and values["Outbound"].source == "crm"


@pytest.mark.parametrize(("column", "value", "needle"), [
    ("OverrideInbound", "carrier-pigeon", "OverrideInbound"),
    ("CrmOutbound", "7", "CrmOutbound"),
    ("OverrideProcessEmailFrom", "yesterday", "ISO date"),
    ("OverrideForwardSink", "not-an-address", "not an email address"),
    ("OverrideTrackedFolders", "{\"Projects\": \"nope\"}", "GUID"),
    ("OverrideTrackedFolders", "[1, 2]", "JSON object"),
])
def test_invalid_values_are_reported_with_reason(column: str, value: str, needle: str) -> None:
    result = parse_mailbox_row(user_row(**{column: value}))
    assert isinstance(result, RowError)
    assert result.address == "alice@contoso.example"
    assert any(needle in r for r in result.reasons), result.reasons


def test_bad_address_and_mismatched_key_are_errors() -> None:
    assert isinstance(parse_mailbox_row({"RowKey": "x", "Address": "no at sign"}), RowError)
    result = parse_mailbox_row(user_row(RowKey="bob@contoso.example"))
    assert isinstance(result, RowError) and "does not match" in result.reasons[0]


def test_removed_disabled_or_switched_off_rows_are_disabled() -> None:
    for flags in ({"RemovedFromCrm": True}, {"CrmDisabled": True}, {"OverrideEnabled": "false"}):
        config = parse_mailbox_row(user_row(**flags))
        assert not isinstance(config, RowError)
        assert not config.enabled_for_incoming and not config.enabled_for_outgoing, flags


def test_sink_rows_are_read_directly_and_use_router_defaults() -> None:
    sink = {"RowKey": "crm-sink@contoso.example", "Address": "crm-sink@contoso.example",
            "OverrideKind": "forward_sink"}
    config = parse_mailbox_row(sink, RouterSettings(delete_after_processing_for_sinks=True))
    assert not isinstance(config, RowError)
    assert config.kind is MailboxKind.FORWARD_SINK and config.owner is None
    assert config.inbound_method is InboundMethod.INDIVIDUAL and config.outbound_method is OutboundMethod.NONE
    assert config.delete_after_processing and config.tracking_filter is TrackingFilter.ALL


def test_users_need_an_owner() -> None:
    result = parse_mailbox_row({"RowKey": "x@y.example", "Address": "x@y.example", "OverrideInbound": "individual"})
    assert isinstance(result, RowError) and "OwnerId" in result.reasons[0]


def test_row_key_encodes_forbidden_characters() -> None:
    assert row_key(" A/b#c@X.example ") == "a%2Fb%23c@x.example"


def test_override_changes_are_validated_and_canonical() -> None:
    assert parse_override_changes({"inbound": "2", "Filter": "contacts", "TrackSentItems": "yes",
                                   "ProcessEmailFrom": "2024-01-02", "Outbound": None}) == {
        "OverrideInbound": "individual", "OverrideFilter": "from_leads_contacts_accounts",
        "OverrideTrackSentItems": True, "OverrideProcessEmailFrom": "2024-01-02T00:00:00Z", "OverrideOutbound": ""}
    with pytest.raises(ValueError, match="Inbound") as info:
        parse_override_changes({"Inbound": "bogus", "Colour": "red"})
    assert "Colour" in str(info.value)


def test_org_rows_value_beats_crm_value_and_bad_values_keep_last_good() -> None:
    rows = [
        {"RowKey": "MaxAttachmentBytes", "CrmValue": "5242880", "Value": "1048576"},
        {"RowKey": "RequireApprovalForUserEmail", "CrmValue": "false"},
        {"RowKey": "NeverLogDomains", "Value": "Example.com; @other.example"},
        {"RowKey": "TrackedCategory", "Value": "In CRM"},
        {"RowKey": "QueueOwnerFallback", "Value": "application_user"},
        {"RowKey": "TrackingUserDigits", "Value": "42"},
        {"RowKey": "Colour", "Value": "red"},
    ]
    result = parse_org_rows(rows, previous={"TrackingUserDigits": 5})
    assert result.org.max_attachment_bytes == 1048576
    assert result.org.require_approval_for_user_email is False
    assert result.org.never_log_domains == frozenset({"example.com", "other.example"})
    assert result.org.queue_owner_fallback is QueueOwnerFallback.APPLICATION_USER
    assert result.org.tracking_user_digits == 5 and result.sources["TrackingUserDigits"] == "last-good"
    assert result.router.tracked_category == "In CRM"
    assert {e.row_key for e in result.errors} == {"TrackingUserDigits", "Colour"}
    assert parse_org_rows([]).org.tracking_user_digits == 3  # default without any row


def test_folder_mapping_round_trip() -> None:
    rid = str(uuid.uuid4())
    changes = parse_override_changes({"TrackedFolders": f'{{"Projects": "account:{rid}"}}'})
    config = parse_mailbox_row(user_row(**changes))
    assert not isinstance(config, RowError)
    assert config.folder_regarding["Projects"].table == "account"
    assert str(config.folder_regarding["Projects"].id) == rid
