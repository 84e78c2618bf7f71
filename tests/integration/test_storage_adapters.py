"""Storage adapters against Azurite: table CRUD and etags, queue base64 interop, poison queue repair."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

from core.adapters.storage import (
    EntityAlreadyExistsError,
    EntityNotFoundError,
    EntityTooLargeError,
    EtagMismatchError,
    InvalidKeyError,
    MessageTooLargeError,
    StorageAccount,
    TableStore,
    encode_key,
    join_text,
    split_text,
)
from core.config import Settings
from core.names import PROCESSED_TABLE
from local.azurite import Azurite

pytestmark = pytest.mark.integration


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def account(azurite: Azurite) -> AsyncIterator[StorageAccount]:
    settings = Settings({"AzureWebJobsStorage": azurite.connection_string, "TABLE_PREFIX": _unique("t")})
    acc = StorageAccount.from_settings(settings)
    try:
        yield acc
    finally:
        await acc.close()


@pytest.fixture
async def table(account: StorageAccount) -> TableStore:
    return account.table(PROCESSED_TABLE)


# ------------------------------------------------------------------ tables


async def test_table_name_carries_the_prefix_and_is_created_once(account: StorageAccount) -> None:
    store = account.table(PROCESSED_TABLE)
    assert store.name == f"{account.table_prefix}{PROCESSED_TABLE}"
    await store.upsert({"PartitionKey": "p", "RowKey": "r"})
    names = [t.name async for t in account.table_service.list_tables()]
    assert store.name in names


async def test_insert_get_and_duplicate(table: TableStore) -> None:
    etag = await table.insert({"PartitionKey": "mbx", "RowKey": "m1", "state": "done", "n": 1})
    assert etag
    got = await table.get("mbx", "m1")
    assert got["state"] == "done" and got["n"] == 1
    assert got.etag == etag
    with pytest.raises(EntityAlreadyExistsError):
        await table.insert({"PartitionKey": "mbx", "RowKey": "m1"})
    assert await table.insert_if_absent({"PartitionKey": "mbx", "RowKey": "m1"}) is False
    assert await table.insert_if_absent({"PartitionKey": "mbx", "RowKey": "m2"}) is True


async def test_get_missing_raises(table: TableStore) -> None:
    with pytest.raises(EntityNotFoundError):
        await table.get("nobody", "nothing")


async def test_upsert_merge_keeps_and_replace_drops_properties(table: TableStore) -> None:
    await table.upsert({"PartitionKey": "p", "RowKey": "r", "a": "1", "b": "2"})
    await table.upsert({"PartitionKey": "p", "RowKey": "r", "b": "3"}, mode="merge")
    merged = await table.get("p", "r")
    assert (merged["a"], merged["b"]) == ("1", "3")
    await table.upsert({"PartitionKey": "p", "RowKey": "r", "c": "4"}, mode="replace")
    replaced = await table.get("p", "r")
    assert "a" not in replaced and replaced["c"] == "4"


async def test_upsert_many_writes_partitions_in_transactions_and_folds_repeated_keys(table: TableStore) -> None:
    await table.upsert({"PartitionKey": "a", "RowKey": "r000", "old": "kept by merge"})
    rows = [{"PartitionKey": p, "RowKey": f"r{i:03d}", "n": i} for p in ("a", "b") for i in range(130)]
    rows.append({"PartitionKey": "a", "RowKey": "r001", "extra": "x"})  # the same key again: merged, not refused
    assert await table.upsert_many(rows, mode="merge") == 260
    first = await table.get("a", "r000")
    assert first["old"] == "kept by merge" and first["n"] == 0
    again = await table.get("a", "r001")
    assert (again["n"], again["extra"]) == (1, "x")
    assert len([e async for e in table.list_partition("b")]) == 130
    assert await table.upsert_many([{"PartitionKey": "a", "RowKey": "r000", "only": 1}], mode="replace") == 1
    assert "old" not in await table.get("a", "r000")
    assert await table.upsert_many([]) == 0


async def test_update_with_etag_detects_concurrent_change(table: TableStore) -> None:
    first = await table.insert({"PartitionKey": "claim", "RowKey": "e1", "state": "pending"})
    second = await table.update({"PartitionKey": "claim", "RowKey": "e1", "state": "sending"}, etag=first)
    assert second and second != first
    with pytest.raises(EtagMismatchError):
        await table.update({"PartitionKey": "claim", "RowKey": "e1", "state": "stolen"}, etag=first)
    with pytest.raises(EtagMismatchError):
        await table.delete("claim", "e1", etag=first)
    assert (await table.get("claim", "e1"))["state"] == "sending"
    await table.delete("claim", "e1", etag=second)
    await table.delete("claim", "e1")  # already gone: still fine
    with pytest.raises(EntityNotFoundError):
        await table.update({"PartitionKey": "claim", "RowKey": "e1", "state": "x"})


async def test_only_one_of_two_concurrent_etag_claims_wins(table: TableStore) -> None:
    etag = await table.insert({"PartitionKey": "claim", "RowKey": "race", "owner": ""})
    results = await asyncio.gather(
        table.update({"PartitionKey": "claim", "RowKey": "race", "owner": "w1"}, etag=etag),
        table.update({"PartitionKey": "claim", "RowKey": "race", "owner": "w2"}, etag=etag),
        return_exceptions=True,
    )
    assert sum(isinstance(r, str) for r in results) == 1
    assert sum(isinstance(r, EtagMismatchError) for r in results) == 1


async def test_query_with_parameters_quotes_values(table: TableStore) -> None:
    tricky = "O'Bryan <a@x.example> or 1 eq 1"
    await table.upsert({"PartitionKey": "q", "RowKey": "1", "who": tricky})
    await table.upsert({"PartitionKey": "q", "RowKey": "2", "who": "someone else"})
    rows = [e async for e in table.query("PartitionKey eq @pk and who eq @who", parameters={"pk": "q", "who": tricky})]
    assert [r["RowKey"] for r in rows] == ["1"]
    assert sorted([r["RowKey"] async for r in table.list_partition("q")]) == ["1", "2"]


async def test_int64_and_long_text_round_trip(table: TableStore) -> None:
    big = 2**40 + 7
    text = "é" * 70_000 + "\U0001f600" * 10  # beyond one 64 KiB property
    await table.upsert({"PartitionKey": "v", "RowKey": "1", "big": big, **split_text("body", text)})
    got = await table.get("v", "1")
    assert got["big"] == big
    assert join_text(got, "body") == text


async def test_oversize_and_bad_keys_are_refused_before_the_service(table: TableStore) -> None:
    with pytest.raises(EntityTooLargeError):
        await table.upsert({"PartitionKey": "v", "RowKey": "big", "body": "x" * 40_000})
    with pytest.raises(InvalidKeyError):
        await table.upsert({"PartitionKey": "v", "RowKey": "<a/b@x>"})
    key = encode_key("<a/b#c?d@x>")
    await table.upsert({"PartitionKey": "v", "RowKey": key})
    assert (await table.get("v", key))["RowKey"] == key


# ------------------------------------------------------------------ queues


async def test_sender_encodes_base64_as_the_functions_host_expects(account: StorageAccount, azurite: Azurite) -> None:
    name = _unique("q")
    sender = account.queue_sender(name)
    item = {"mailbox": "u1", "message": "AAMk+/=", "subject": "Grüße"}
    await sender.send(item)
    await sender.close()
    # No decode policy = the SDK hands back the stored text unchanged.
    async with QueueClient.from_connection_string(azurite.connection_string, name) as raw_client:
        [raw] = await raw_client.peek_messages()
    # What is stored is base64 of the UTF-8 JSON: exactly what the host decodes with messageEncoding=base64.
    assert json.loads(base64.b64decode(raw.content).decode("utf-8")) == item


async def test_browser_reads_messages_sent_by_the_sdk_policy(account: StorageAccount, azurite: Azurite) -> None:
    name = _unique("q")
    async with QueueClient.from_connection_string(
        azurite.connection_string, name, message_encode_policy=TextBase64EncodePolicy()
    ) as sdk:
        await sdk.create_queue()
        await sdk.send_message('{"k": "v"}')
    [item] = await account.queue_browser(name).peek()
    assert item.encoding == "base64"
    assert item.json() == {"k": "v"}


async def test_visibility_delay_hides_the_message(account: StorageAccount) -> None:
    name = _unique("q")
    sender = account.queue_sender(name)
    await sender.send("later", visibility_delay=600)
    await sender.send("now")
    visible = await account.queue_browser(name).peek()
    assert [i.content for i in visible] == ["now"]


async def test_send_many_sends_everything_with_bounded_concurrency(account: StorageAccount, azurite: Azurite) -> None:
    name = _unique("q")
    sender = account.queue_sender(name, max_concurrency=4)
    ids = await sender.send_many([{"n": n} for n in range(40)])
    assert len(ids) == 40 and len(set(ids)) == 40
    async with QueueClient.from_connection_string(
        azurite.connection_string, name, message_decode_policy=TextBase64DecodePolicy()
    ) as reader:
        seen = {json.loads(m.content)["n"] async for m in reader.receive_messages(messages_per_page=32)}
    assert seen == set(range(40))


async def test_send_refuses_oversize_messages(account: StorageAccount) -> None:
    sender = account.queue_sender(_unique("q"))
    with pytest.raises(MessageTooLargeError):
        await sender.send("x" * 50_000)
    with pytest.raises(MessageTooLargeError):
        await sender.send_many(["ok", "x" * 50_000])


async def test_poison_message_sent_raw_is_readable_and_moved_back_encoded(
    account: StorageAccount, azurite: Azurite
) -> None:
    origin = _unique("q")
    poison = f"{origin}-poison"
    # The classic trap: a producer enqueues without base64; the host cannot decode it and poisons it.
    async with QueueClient.from_connection_string(azurite.connection_string, poison) as raw_producer:
        await raw_producer.create_queue()
        await raw_producer.send_message('{"work": "item"}')
    browser = account.queue_browser(poison)
    [peeked] = await browser.peek()
    assert (peeked.encoding, peeked.content, peeked.pop_receipt) == ("raw", '{"work": "item"}', None)
    [received] = await browser.receive(visibility_timeout=60)
    assert received.dequeue_count == 1
    await browser.move_back(received)
    assert await browser.peek() == []
    [moved] = await account.queue_browser(origin).peek()
    assert (moved.encoding, moved.json()) == ("base64", {"work": "item"})


async def test_peek_of_a_missing_queue_is_empty(account: StorageAccount) -> None:
    assert await account.queue_browser(_unique("q") + "-poison").peek() == []
