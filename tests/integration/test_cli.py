"""The `emailrouter` CLI in-process (``core.cli.main``) against Azurite and the emulators, configured through a
``local.settings.json`` in the working directory, with ``--json`` output checked."""

from __future__ import annotations

import asyncio
import json
import smtplib
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from core.adapters.inbound_state import TablePoisonLog
from core.bootstrap import Container
from core.cli import main
from core.config import Settings
from core.names import INBOUND_QUEUE, POISON_LOG_TABLE
from local.azurite import Azurite
from tests.unit.settings.localstack import DOMAIN, LocalStack, start_local_stack

pytestmark = pytest.mark.integration

ALICE, BOB, SINK = f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"crm-sink@{DOMAIN}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, azurite: Azurite) -> Iterator[LocalStack]:
    yield from start_local_stack(tmp_path_factory.mktemp("tls"), azurite)


@pytest.fixture(scope="module")
def workdir(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    (folder / "local.settings.json").write_text(json.dumps({"IsEncrypted": False, "Values": stack.fresh_values()}))
    return folder


@pytest.fixture
def cli(workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    monkeypatch.chdir(workdir)
    for name in ("AzureWebJobsStorage", "TABLE_PREFIX", "GRAPH_BASE_URL", "DATAVERSE_URL", "WEBHOOK_BASE_URL"):
        monkeypatch.delenv(name, raising=False)

    def run(*argv: str) -> tuple[int, Any, str]:
        capsys.readouterr()
        code = main(["--json", *argv])
        captured = capsys.readouterr()
        data = json.loads(captured.out) if captured.out.strip() else None
        return code, data, captured.err

    return run


def values(workdir: Path) -> dict[str, str]:
    return dict(json.loads((workdir / "local.settings.json").read_text())["Values"])


def test_sync_list_show_and_set(cli: Any) -> None:
    code, report, _ = cli("sync-crm")
    assert code == 0 and ALICE in report["added"] and BOB in report["added"]
    code, listing, _ = cli("mailbox", "list")
    assert code == 0
    alice = next(m for m in listing["mailboxes"] if m["address"] == ALICE)
    assert alice["inbound"] == "individual" and alice["outbound"] == "router" and alice["health"] == "unknown"

    code, written, _ = cli("mailbox", "set", ALICE, "--filter", "all", "--track-sent-items", "true")
    assert code == 0 and written["effective"]["filter"] == "all" and written["effective"]["track_sent_items"]
    code, shown, _ = cli("mailbox", "show", ALICE)
    assert code == 0 and shown["fields"]["Filter"]["source"] == "override"
    assert shown["fields"]["Inbound"]["source"] == "crm" and shown["valid"]

    code, _, err = cli("mailbox", "set", ALICE, "--inbound", "pigeon")
    assert code == 1 and "pigeon" in err and "not written" in err
    code, _, err = cli("mailbox", "show", "nobody@nowhere.example")
    assert code == 1 and "sync-crm" in err

    code, again, _ = cli("sync-crm")  # the override survives a sync
    assert code == 0 and not again["added"]
    code, shown, _ = cli("mailbox", "show", ALICE)
    assert shown["effective"]["filter"] == "all"


def test_settings_get_and_set(cli: Any) -> None:
    code, stored, _ = cli("settings", "set", "maxattachmentbytes", "1024")
    assert code == 0 and stored == {"key": "MaxAttachmentBytes", "value": "1024"}
    code, one, _ = cli("settings", "get", "MaxAttachmentBytes")
    assert code == 0 and one["effective"] == "1024" and one["source"] == "value"
    code, every, _ = cli("settings", "get")
    assert code == 0 and every["settings"]["UndeliverableCategory"]["effective"] == "Undeliverable"
    assert every["settings"]["TrackedCategory"]["effective"] == ""  # off by default: one Graph call per email
    code, _, err = cli("settings", "set", "MaxAttachmentBytes", "lots")
    assert code == 1 and "not an integer" in err
    code, _, err = cli("settings", "set", "Colour", "red")
    assert code == 1 and "unknown org setting" in err


def test_mailbox_test_reports_checks(cli: Any) -> None:
    cli("sync-crm")
    code, outcome, _ = cli("mailbox", "test", ALICE)
    names = {c["name"]: c for c in outcome["checks"]}
    assert set(names) == {"crm_owner", "graph_read", "graph_send", "subscription", "sss_incoming", "sss_outgoing",
                          "crm_concurrency"}
    assert names["graph_read"]["ok"] and names["graph_send"]["ok"] and names["crm_owner"]["ok"]
    assert names["sss_outgoing"]["ok"] and names["crm_concurrency"]["ok"]
    assert not names["subscription"]["ok"]  # nothing reconciled yet
    assert code == 1 and outcome["health"] == "failing"
    code, listing, _ = cli("mailbox", "list")
    assert next(m for m in listing["mailboxes"] if m["address"] == ALICE)["health"] == "failing"


def test_subscriptions_and_unavailable_inputs(cli: Any) -> None:
    code, subs, _ = cli("subscriptions", "list")
    assert code == 0 and subs == []
    code, _, err = cli("subscriptions", "reconcile")
    assert code == 1 and "WEBHOOK_BASE_URL" in err
    code, _, err = cli("explain", "<nothing@example.org>")
    assert code == 1 and "no decision recorded" in err


def test_poison_list_replay_discard(cli: Any, workdir: Path) -> None:
    async def seed() -> None:
        container = Container(Settings(values(workdir)))
        try:
            sender = container.storage.queue_sender(INBOUND_QUEUE + "-poison")
            await sender.send('{"kind":"inbound","n":1}')
            await sender.send('{"kind":"inbound","n":2}')
            await sender.close()
            await TablePoisonLog(container.storage.table(POISON_LOG_TABLE)).record(
                queue=INBOUND_QUEUE + "-poison", message='{"kind":"inbound","n":1}', dequeue_count=5,
                reason="Dataverse 400: bad column")
        finally:
            await container.storage.close()

    asyncio.run(seed())
    code, items, _ = cli("poison", "list", "inbound-mail")
    assert code == 0 and len(items) == 2
    by_n = {json.loads(i["content"])["n"]: i for i in items}
    assert by_n[1]["reason"] == "Dataverse 400: bad column" and by_n[2]["reason"] == "(no reason recorded)"

    code, replayed, _ = cli("poison", "replay", by_n[1]["id"])
    assert code == 0 and replayed["replayed"] == [by_n[1]["id"]]
    code, discarded, _ = cli("poison", "discard", by_n[2]["id"])
    assert code == 0 and discarded["discarded"] == [by_n[2]["id"]]
    code, _, err = cli("poison", "discard", "no-such-id")
    assert code == 1 and "no poisoned message" in err

    async def inbound_queue() -> list[str]:
        container = Container(Settings(values(workdir)))
        try:
            browser = container.storage.queue_browser(INBOUND_QUEUE)
            items = await browser.peek(32)
            await browser.close()
            return [i.content for i in items if i.encoding == "base64"]
        finally:
            await container.storage.close()

    assert '{"kind":"inbound","n":1}' in asyncio.run(inbound_queue())  # back on its queue, base64 as the host reads
    code, status, _ = cli("status")
    assert code == 0 and status["poison"]["inbound-mail-poison"] == 0 and status["queues"]["inbound-mail"] >= 1


def test_forward_rules_deploy_produces_a_working_rule(cli: Any, stack: LocalStack, workdir: Path) -> None:
    cli("sync-crm")
    code, first, _ = cli("forward-rules", "deploy", "--users", BOB, "--sink", SINK)
    assert code == 0 and first[0]["result"] == "created"
    code, second, _ = cli("forward-rules", "deploy", "--users", BOB, "--sink", SINK)
    assert code == 0 and second[0]["result"] == "unchanged"  # idempotent
    code, shown, _ = cli("mailbox", "show", BOB)
    assert shown["effective"]["forward_sink"] == SINK

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "fiona@fabrikam.example", BOB, "Quote for Bob"
    message["Message-ID"] = "<quote-1@fabrikam.example>"
    message.set_content("Hello Bob")
    assert stack.graph.smtp_port is not None
    with smtplib.SMTP("127.0.0.1", stack.graph.smtp_port, timeout=30) as smtp:
        smtp.send_message(message)

    async def sink_items() -> list[dict[str, Any]]:
        container = Container(Settings(values(workdir)))
        try:
            found: list[dict[str, Any]] = []
            for _ in range(100):  # bounded wait for delivery (not a timing assertion)
                found = [m async for m in container.graph.list_messages(SINK, "inbox")]
                if found:
                    break
                await asyncio.sleep(0.05)
            out = []
            for m in found:
                full = await container.graph.get_message(SINK, m["id"])
                out.append(full)
            return out
        finally:
            await container.graph.close()

    wrappers = asyncio.run(sink_items())
    assert wrappers, "the forwarded wrapper reached the sink"
    wrapper = wrappers[0]
    assert wrapper["from"]["emailAddress"]["address"].lower() == BOB
    attachments = wrapper.get("attachments") or []
    assert any(a.get("@odata.type") == "#microsoft.graph.itemAttachment" for a in attachments)

    # ... and is tracked for bob (the processor unwraps it in the sink; owner = the forwarding user).
    async def process_wrapper() -> list[str]:
        from core.work_items import InboundItem

        container = Container(Settings(values(workdir)))
        try:
            sender = container.storage.queue_sender(INBOUND_QUEUE)
            await sender.send(InboundItem(SINK, wrapper["id"], "notification", folder="inbox").to_json())
            await sender.close()
            return await _drain_inbound(container)
        finally:
            await container.storage.close()
            await container.graph.close()

    assert "tracked" in asyncio.run(process_wrapper())
    bob_id = stack.dv("GET", f"systemusers?$select=systemuserid&$filter=internalemailaddress eq '{BOB}'"
                      ).json()["value"][0]["systemuserid"]
    (tracked,) = stack.dv("GET", "emails?$select=_ownerid_value,subject&$filter=messageid eq "
                                 "'<quote-1@fabrikam.example>'").json()["value"]
    assert tracked["_ownerid_value"] == bob_id and tracked["subject"] == "Quote for Bob"

    code, removed, _ = cli("forward-rules", "remove", "--users", BOB)
    assert code == 0 and removed[0]["result"] == "removed"
    code, again, _ = cli("forward-rules", "remove", "--users", BOB)
    assert again[0]["result"] == "absent"


def _send_mail(stack: LocalStack, to: str, subject: str) -> str:
    message = EmailMessage()
    message_id = f"<{uuid.uuid4().hex}@fabrikam.example>"
    message["From"], message["To"], message["Subject"] = "fiona@fabrikam.example", to, subject
    message["Message-ID"] = message_id
    message.set_content("Hello")
    assert stack.graph.smtp_port is not None
    with smtplib.SMTP("127.0.0.1", stack.graph.smtp_port, timeout=30) as smtp:
        smtp.send_message(message)
    return message_id


async def _graph_id(container: Container, mailbox: str, internet_message_id: str) -> str:
    for _ in range(200):  # bounded wait for delivery (not a timing assertion)
        found = await container.graph.find_messages_by_internet_id(mailbox, internet_message_id)
        if found:
            return str(found[0]["id"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"{internet_message_id} never reached {mailbox}")


async def _drain_inbound(container: Container) -> list[str]:
    """What the host's queue trigger does, until the inbound queue is empty: the real processor on each item."""
    from core.services.inbound import processor_for

    outcomes: list[str] = []
    browser = container.storage.queue_browser(INBOUND_QUEUE)
    try:
        for _ in range(50):
            batch = await browser.receive(32, visibility_timeout=60)
            if not batch:
                break
            for item in batch:
                try:
                    result = await processor_for(container).handle_message(item.content,
                                                                            dequeue_count=item.dequeue_count or 1)
                    outcomes.append(result.outcome)
                except Exception as exc:  # e.g. another test's deliberately malformed item: the host would retry
                    outcomes.append(f"error:{type(exc).__name__}")
                await browser.delete(item)
    finally:
        await browser.close()
    return outcomes


def _crm_emails(stack: LocalStack, internet_message_id: str) -> list[dict[str, Any]]:
    escaped = internet_message_id.replace("'", "''")
    return list(stack.dv("GET", f"emails?$select=activityid,subject&$filter=messageid eq '{escaped}'")
                .json()["value"])


def test_backfill_is_idempotent_through_the_pipeline(cli: Any, stack: LocalStack, workdir: Path) -> None:
    assert cli("sync-crm")[0] == 0
    assert cli("mailbox", "set", ALICE, "--filter", "all")[0] == 0
    message_id = _send_mail(stack, ALICE, "Backfilled")

    async def in_mailbox_then(drain: bool) -> list[str]:
        container = Container(Settings(values(workdir)))
        try:
            await _graph_id(container, ALICE, message_id)
            return await _drain_inbound(container) if drain else []
        finally:
            await container.storage.close()
            await container.graph.close()

    asyncio.run(in_mailbox_then(drain=True))  # nothing subscribed here: whatever is queued is from other tests
    code, first, err = cli("backfill", ALICE, "--since", "2000-01-01")
    assert code == 0, err
    code, second, _ = cli("backfill", ALICE, "--since", "2000-01-01")
    assert code == 0 and second["enqueued"] == first["enqueued"] >= 1

    async def run() -> list[str]:
        return await in_mailbox_then(drain=True)

    outcomes = asyncio.run(run())
    assert "tracked" in outcomes
    assert len(_crm_emails(stack, message_id)) == 1  # two backfills, one CRM email
    code, _, err = cli("backfill", f"dave@{DOMAIN}", "--since", "2000-01-01")
    assert code == 1 and "does not read this mailbox" in err


def test_poison_replay_reprocesses_the_item(cli: Any, stack: LocalStack, workdir: Path) -> None:
    from core.work_items import InboundItem

    assert cli("sync-crm")[0] == 0
    assert cli("mailbox", "set", ALICE, "--filter", "all")[0] == 0
    message_id = _send_mail(stack, ALICE, "Poisoned once")

    async def poison() -> None:
        container = Container(Settings(values(workdir)))
        try:
            graph_id = await _graph_id(container, ALICE, message_id)
            await _drain_inbound(container)
            # As the host leaves it after maxDequeueCount failures: the work item, unchanged, in <queue>-poison.
            sender = container.storage.queue_sender(INBOUND_QUEUE + "-poison")
            await sender.send(InboundItem(ALICE, graph_id, "notification", folder="inbox").to_json())
            await sender.close()
        finally:
            await container.storage.close()
            await container.graph.close()

    asyncio.run(poison())
    assert _crm_emails(stack, message_id) == []
    code, items, _ = cli("poison", "list", "inbound-mail")
    ours = [i for i in items if ALICE in i["content"]]
    assert code == 0 and ours
    code, replayed, _ = cli("poison", "replay", "--all", "--queue", "inbound-mail")
    assert code == 0 and ours[0]["id"] in replayed["replayed"]

    async def drain() -> list[str]:
        container = Container(Settings(values(workdir)))
        try:
            return await _drain_inbound(container)
        finally:
            await container.storage.close()
            await container.graph.close()

    assert "tracked" in asyncio.run(drain())
    assert len(_crm_emails(stack, message_id)) == 1
