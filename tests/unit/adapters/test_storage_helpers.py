"""Pure parts of the storage adapters: keys, Azure Table limits, long-text splitting, queue encoding, config."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.adapters.storage import (
    MAX_ENTITY_BYTES,
    EntityTooLargeError,
    InvalidKeyError,
    MessageTooLargeError,
    StorageAccount,
    _check_message_size,
    _decode_content,
    _delay_seconds,
    decode_key,
    encode_key,
    entity_size,
    hash_key,
    join_text,
    split_text,
    validate_entity,
)
from core.config import MissingSettingError, Settings


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        ("plain", "plain"),
        ("<a/b@x>", "<a%2Fb@x>"),
        ("50%#1?\\", "50%25%231%3F%5C"),
        ("tab\there", "tab%09here"),
        ("\x80", "%C2%80"),
    ],
)
def test_encode_key(raw: str, encoded: str) -> None:
    assert encode_key(raw) == encoded


@given(st.text())
def test_encode_key_is_reversible_and_valid(raw: str) -> None:
    try:
        key = encode_key(raw)
    except InvalidKeyError:
        assert len(raw) > 1024 // 6  # only long input can fail (a char expands to at most 6: "%C2%80")
        return
    assert decode_key(key) == raw
    validate_entity({"PartitionKey": key, "RowKey": key})


def test_hash_key_is_fixed_length_and_valid() -> None:
    key = hash_key("<" + "x" * 5000 + "@example>")
    assert len(key) == 64
    validate_entity({"PartitionKey": "p", "RowKey": key})


def test_validate_entity_refuses_what_the_service_would() -> None:
    validate_entity({"PartitionKey": "p", "RowKey": "r", "s": "x" * 32_768})  # exactly 64 KiB as UTF-16
    with pytest.raises(EntityTooLargeError, match="'s'"):
        validate_entity({"PartitionKey": "p", "RowKey": "r", "s": "x" * 32_769})
    with pytest.raises(EntityTooLargeError):
        validate_entity({"PartitionKey": "p", "RowKey": "r", "s": "\U0001f600" * 16_385})  # surrogate pairs count 2
    with pytest.raises(EntityTooLargeError):
        validate_entity({"PartitionKey": "p", "RowKey": "r", "b": b"\0" * (64 * 1024 + 1)})
    with pytest.raises(EntityTooLargeError, match="limit"):
        validate_entity({"PartitionKey": "p", "RowKey": "r", **{f"s{n}": "x" * 30_000 for n in range(20)}})
    with pytest.raises(EntityTooLargeError, match="properties"):
        validate_entity({"PartitionKey": "p", "RowKey": "r", **{f"p{n}": n for n in range(253)}})
    with pytest.raises(InvalidKeyError):
        validate_entity({"PartitionKey": "a/b", "RowKey": "r"})
    with pytest.raises(InvalidKeyError):
        validate_entity({"PartitionKey": "p", "RowKey": "x" * 1025})
    with pytest.raises(InvalidKeyError):
        validate_entity({"PartitionKey": "p", "RowKey": 5})


def test_entity_size_follows_the_documented_formula() -> None:
    # 4 + 2*len(pk) + 2*len(rk) + per property 8 + 2*len(name) + value
    assert entity_size({"PartitionKey": "p", "RowKey": "r"}) == 8
    assert entity_size({"PartitionKey": "p", "RowKey": "r", "n": 1}) == 8 + 8 + 2 + 8
    assert entity_size({"PartitionKey": "p", "RowKey": "r", "s": "ab"}) == 8 + 8 + 2 + 4 + 4
    assert entity_size({"PartitionKey": "p", "RowKey": "r", "f": True}) == 8 + 8 + 2 + 1
    assert entity_size({"PartitionKey": "", "RowKey": "", "d": dt.datetime.now(dt.UTC)}) == 4 + 8 + 2 + 8


@settings(max_examples=50)
@given(st.text(), st.integers(min_value=2, max_value=50))
def test_split_and_join_round_trip(text: str, max_units: int) -> None:
    parts = split_text("body", text, max_units=max_units)
    assert join_text(parts, "body") == text
    for name, value in parts.items():
        if isinstance(value, str):
            assert len(value.encode("utf-16-le")) // 2 <= max_units, name


def test_split_text_counts_parts_so_stale_parts_are_ignored() -> None:
    long = split_text("body", "x" * 70_000)
    assert long["body__parts"] == 3 and {"body", "body__1", "body__2"} <= set(long)
    validate_entity({"PartitionKey": "p", "RowKey": "r", **long})
    # a later, shorter value merged over the old entity leaves body__1/__2 behind; __parts wins
    merged = {**long, **split_text("body", "short")}
    assert join_text(merged, "body") == "short"
    assert join_text({"body": "plain"}, "body") == "plain"
    assert join_text({}, "body") == ""


def test_big_text_still_has_to_fit_the_entity() -> None:
    with pytest.raises(EntityTooLargeError):
        validate_entity({"PartitionKey": "p", "RowKey": "r", **split_text("body", "x" * (MAX_ENTITY_BYTES // 2))})


def test_queue_message_size_limit_counts_base64() -> None:
    _check_message_size("x" * 49_152)  # 48 KiB -> exactly 64 KiB of base64
    with pytest.raises(MessageTooLargeError):
        _check_message_size("x" * 49_153)
    with pytest.raises(MessageTooLargeError):
        _check_message_size("é" * 24_577)  # 2 bytes each in UTF-8


@pytest.mark.parametrize(
    ("stored", "content", "encoding"),
    [
        (base64.b64encode('{"a": "Grüße"}'.encode()).decode(), '{"a": "Grüße"}', "base64"),
        ('{"a": 1}', '{"a": 1}', "raw"),  # not base64: the encoding trap
        ("abc", "abc", "raw"),  # invalid padding
        (base64.b64encode(b"\xff\xfe").decode(), base64.b64encode(b"\xff\xfe").decode(), "raw"),  # not UTF-8
        ("", "", "base64"),
        (None, "", "base64"),
    ],
)
def test_decode_content(stored: str | None, content: str, encoding: str) -> None:
    assert _decode_content(stored) == (content, encoding)


@pytest.mark.parametrize(
    ("delay", "seconds"),
    [(None, None), (0, 0), (0.2, 1), (12.0, 12), (dt.timedelta(minutes=2), 120), (10**9, 7 * 24 * 3600)],
)
def test_delay_seconds(delay: float | dt.timedelta | None, seconds: int | None) -> None:
    assert _delay_seconds(delay) == seconds


def test_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError):
        _delay_seconds(-1)


async def test_from_settings_identity_mode_uses_endpoints_and_a_managed_identity() -> None:
    settings = Settings({
        "AzureWebJobsStorage__queueServiceUri": "https://acct.queue.core.windows.net",
        "AzureWebJobsStorage__tableServiceUri": "https://acct.table.core.windows.net",
        "AzureWebJobsStorage__clientId": "00000000-0000-0000-0000-0000000000aa",
        "TABLE_PREFIX": "router",
    })
    account = StorageAccount.from_settings(settings)
    try:
        from azure.identity.aio import ManagedIdentityCredential

        assert isinstance(account._credential, ManagedIdentityCredential)
        assert account.table("Processed").name == "routerProcessed"
        assert account.table_service.url.startswith("https://acct.table.core.windows.net")
        assert account.queue_service.url.startswith("https://acct.queue.core.windows.net")
    finally:
        await account.close()


def test_from_settings_without_storage_names_the_setting() -> None:
    with pytest.raises(MissingSettingError, match="AzureWebJobsStorage"):
        StorageAccount.from_settings(Settings({}))
