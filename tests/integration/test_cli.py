"""The `emailrouter` CLI in-process (``core.cli.main``) against Azurite and the emulators, configured through a
``local.settings.json`` in the working directory, with ``--json`` output checked."""

from __future__ import annotations

import asyncio
import io
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
    # The sync re-probed the mailboxes it added: Alice waits for her first subscription (pending, not failing).
    assert alice["inbound"] == "individual" and alice["outbound"] == "router" and alice["health"] == "pending"

    code, written, _ = cli("mailbox", "set", ALICE, "--filter", "all", "--track-sent-items", "true")
    assert code == 0 and written["effective"]["filter"] == "all" and written["effective"]["track_sent_items"]
    code, shown, _ = cli("mailbox", "show", ALICE)
    assert code == 0 and shown["fields"]["Filter"]["source"] == "override"
    assert shown["fields"]["Inbound"]["source"] == "crm" and shown["valid"]

    code, _, err = cli("mailbox", "set", ALICE, "--inbound", "pigeon")
    assert code == 2 and "pigeon" in err and "not written" in err  # a usage error, found before any write
    code, _, err = cli("mailbox", "show", "nobody@nowhere.example")
    assert code == 1 and "sync-crm" in err

    code, again, _ = cli("sync-crm")  # the override survives a sync
    assert code == 0 and not again["added"]
    code, shown, _ = cli("mailbox", "show", ALICE)
    assert shown["effective"]["filter"] == "all"


def test_settings_get_and_set(cli: Any) -> None:
    code, stored, _ = cli("settings", "set", "maxattachmentbytes", "1024")
    # a setting that decides what is tracked: the command for mail decided before is printed with it
    assert code == 0 and stored == {"key": "MaxAttachmentBytes", "value": "1024",
                                    "past_mail": "emailrouter reprocess --all --since 7d"}
    code, one, _ = cli("settings", "get", "MaxAttachmentBytes")
    assert code == 0 and one["effective"] == "1024" and one["source"] == "value"
    code, every, _ = cli("settings", "get")
    assert code == 0 and every["settings"]["UndeliverableCategory"]["effective"] == "Undeliverable"
    assert every["settings"]["TrackedCategory"]["effective"] == ""  # off by default: one Graph call per email
    code, _, err = cli("settings", "set", "MaxAttachmentBytes", "lots")
    assert code == 1 and "not an integer" in err
    code, _, err = cli("settings", "set", "Colour", "red")
    assert code == 1 and "unknown org setting" in err


def test_mailbox_test_reports_checks(cli: Any, stack: LocalStack) -> None:
    cli("sync-crm")
    code, outcome, _ = cli("mailbox", "test", ALICE)
    names = {c["name"]: c for c in outcome["checks"]}
    assert set(names) == {"crm_owner", "crm_write", "graph_read", "graph_send", "subscription", "sss_incoming",
                          "sss_outgoing", "crm_concurrency"}
    assert names["graph_read"]["ok"] and names["graph_send"]["ok"] and names["crm_owner"]["ok"]
    assert names["crm_write"]["ok"], names["crm_write"]
    assert names["sss_outgoing"]["ok"] and names["crm_concurrency"]["ok"]
    assert not names["subscription"]["ok"] and names["subscription"]["pending"]  # nothing reconciled yet
    assert code == 0 and outcome["health"] == "pending"  # waiting for the router is not a failure
    code, listing, _ = cli("mailbox", "list")
    alice = next(m for m in listing["mailboxes"] if m["address"] == ALICE)
    assert alice["health"] == "pending"
    # The CRM write check wrote the mailbox record's "last tested" column, and nothing else of ours.
    (record,) = stack.dv("GET", f"mailboxes?$select=testmailboxaccesscompletedon&$filter=mailboxid eq "
                                f"{alice['mailbox_id']}").json()["value"]
    assert record["testmailboxaccesscompletedon"]

    code, outcomes, _ = cli("mailbox", "test", "--all", "--no-crm-write")
    by_address = {o["address"]: o for o in outcomes}
    assert {ALICE, BOB, f"support@{DOMAIN}"} <= set(by_address)
    assert all(c["name"] != "crm_write" for o in outcomes for c in o["checks"])
    assert by_address[BOB]["health"] == "failing"  # no forward rule yet: the probe says so
    assert any(c["name"] == "forward_rule" and not c["ok"] for c in by_address[BOB]["checks"])
    assert code == 1  # some mailbox is failing
    code, _, err = cli("mailbox", "test")
    assert code == 2 and "--all" in err


def test_subscriptions_and_unavailable_inputs(cli: Any) -> None:
    code, subs, _ = cli("subscriptions", "list")
    assert code == 0 and subs == []
    code, _, err = cli("subscriptions", "reconcile")
    assert code == 3 and "WEBHOOK_BASE_URL" in err  # not configured
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
    code, _, err = cli("poison", "discard", by_n[2]["id"])  # destructive: no terminal, no --yes -> refused
    assert code == 2 and "--yes" in err
    code, listed, _ = cli("poison", "list", "inbound-mail")
    assert [i["id"] for i in listed] == [by_n[2]["id"]]  # still there
    code, discarded, _ = cli("poison", "discard", by_n[2]["id"], "--yes")
    assert code == 0 and discarded["discarded"] == [by_n[2]["id"]]
    code, _, err = cli("poison", "discard", "no-such-id", "--yes")
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
    code, first, _ = cli("forward-rules", "deploy", "--users", BOB, "--sink", SINK, "--yes")
    assert code == 0 and first[0]["result"] == "created"
    code, second, _ = cli("forward-rules", "deploy", "--users", BOB, "--sink", SINK)  # nothing to change: no question
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

    code, removed, _ = cli("forward-rules", "remove", "--users", BOB, "--yes")
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


def _drain_once(workdir: Path) -> list[str]:
    """One drain of the inbound queue through a fresh container, as the host's trigger would."""
    async def run() -> list[str]:
        container = Container(Settings(values(workdir)))
        try:
            return await _drain_inbound(container)
        finally:
            await container.close()

    return asyncio.run(run())


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
    code, replayed, _ = cli("poison", "replay", "--all", "--queue", "inbound-mail", "--yes")
    assert code == 0 and ours[0]["id"] in replayed["replayed"]

    assert "tracked" in _drain_once(workdir)
    assert len(_crm_emails(stack, message_id)) == 1


# ------------------------------------------------------------------------------------------------ conventions


def _plain(workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
           *argv: str) -> tuple[int, str, str]:
    """The CLI as an admin types it (no --json added), output as text (a wide terminal: rich wraps cells)."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("COLUMNS", "240")
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_global_options_anywhere_version_and_help_everywhere(cli: Any, workdir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from core.cli import build_parser, version
    from core.cli.registry import COMMANDS

    assert cli("sync-crm")[0] == 0
    code, out, _ = _plain(workdir, monkeypatch, capsys, "mailbox", "list", "--json")
    assert code == 0 and any(m["address"] == ALICE for m in json.loads(out)["mailboxes"])
    # --settings after the command, from another directory: the file's values are used.
    code, out, _ = _plain(tmp_path, monkeypatch, capsys, "settings", "get", "UndeliverableCategory", "--json",
                          "--settings", str(workdir / "local.settings.json"))
    assert code == 0 and json.loads(out)["effective"] == "Undeliverable"

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and version() in capsys.readouterr().out

    build_parser()
    assert {("forward-rules", "deploy"), ("forward-rules", "remove"), ("subscriptions", "list"), ("explain",),
            ("skipped", "list"), ("outbound", "list"), ("status",)} <= set(COMMANDS)
    for path, spec in COMMANDS.items():
        with pytest.raises(SystemExit) as exited:
            main([*path, "--help"])
        text = capsys.readouterr().out
        assert exited.value.code == 0 and f"usage: emailrouter {' '.join(path)}" in text, path
        assert spec.help and "--json" in text, path
        assert ("--dry-run" in text and "--yes" in text) == spec.destructive, path
    with pytest.raises(SystemExit):
        main(["mailbox", "set", "--help"])
    text = capsys.readouterr().out
    assert "--enabled {true,false}" in text and "--inbound {none,outlook,individual,forward}" in text


def test_mailbox_set_allowed_values_in_help_all_parse() -> None:
    from core.cli.commands import SET_METAVARS
    from core.settings.rows import FIELDS

    by_name = {f.name: f for f in FIELDS}
    for name, metavar in SET_METAVARS.items():
        if metavar.startswith("{"):
            for value in metavar.strip("{}").split(","):
                by_name[name].parse(value)  # raises if help lists a value the parser refuses


def test_exit_codes(cli: Any, workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("AzureWebJobsStorage", "AzureWebJobsStorage__queueServiceUri", "AzureWebJobsStorage__tableServiceUri"):
        monkeypatch.delenv(name, raising=False)
    # 3: not configured (an empty directory: no local.settings.json, no stack) ...
    code, _, err = _plain(tmp_path, monkeypatch, capsys, "mailbox", "list")
    assert code == 3 and "AzureWebJobsStorage" in err
    # ... with a stopped local stack, the hint says so.
    (tmp_path / ".local").mkdir()
    (tmp_path / ".local" / "stack.json").write_text(json.dumps({"running": False}))
    code, _, err = _plain(tmp_path, monkeypatch, capsys, "status")
    assert code == 3 and "make run" in err
    # 2: usage errors come before configuration errors.
    code, _, err = _plain(tmp_path, monkeypatch, capsys, "mailbox", "set", ALICE)
    assert code == 2 and "nothing to set" in err
    code, _, err = _plain(tmp_path, monkeypatch, capsys, "mailbox", "set", ALICE, "--filter", "bogus")
    assert code == 2 and "bogus" in err
    code, _, err = _plain(tmp_path, monkeypatch, capsys, "skipped", "list", "--since", "yesterday-ish")
    assert code == 2 and "--since" in err
    with pytest.raises(SystemExit) as exited:
        main(["mailbox", "frobnicate"])
    assert exited.value.code == 2
    # 1: the command ran and failed.
    monkeypatch.chdir(workdir)
    code, _, err = cli("mailbox", "show", "nobody@nowhere.example")
    assert code == 1 and "sync-crm" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_destructive_commands_show_and_ask(cli: Any, stack: LocalStack, workdir: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("sync-crm")[0] == 0
    assert cli("forward-rules", "remove", "--users", BOB, "--yes")[0] == 0

    def bob_rules() -> list[dict[str, Any]]:
        async def read() -> list[dict[str, Any]]:
            container = Container(Settings(values(workdir)))
            try:
                return [r for r in await container.graph.list_inbox_rules(BOB)
                        if r.get("displayName") == "Email Router: forward to CRM"]
            finally:
                await container.graph.close()
        return asyncio.run(read())

    # Without a terminal and without --yes: refused, nothing changed.
    code, _, err = cli("forward-rules", "deploy", "--users", BOB, "--sink", SINK)
    assert code == 2 and "--yes" in err and bob_rules() == []
    # --dry-run lists the users and what would change, and changes nothing (the Rule Deployment Wizard's list).
    code, out, _ = _plain(workdir, monkeypatch, capsys, "forward-rules", "deploy", "--users", BOB, "--sink", SINK,
                          "--dry-run")
    assert code == 0 and BOB in out and "create rule" in out and bob_rules() == []
    code, dry, _ = cli("forward-rules", "deploy", "--users", BOB, "--sink", SINK, "--dry-run")
    assert dry["dry_run"] and len(dry["items"]) == 1
    assert dry["items"][0].startswith(f"{BOB}: create rule forwarding as attachment to {SINK}")
    # At a terminal: asked; "n" changes nothing (exit 1), "y" deploys.
    monkeypatch.setattr("sys.stdin", _Terminal("n\n"))
    code, _, err = _plain(workdir, monkeypatch, capsys, "forward-rules", "deploy", "--users", BOB, "--sink", SINK)
    assert code == 1 and "Proceed?" in err and "not confirmed" in err and bob_rules() == []
    monkeypatch.setattr("sys.stdin", _Terminal("y\n"))
    code, out, err = _plain(workdir, monkeypatch, capsys, "forward-rules", "deploy", "--users", BOB, "--sink", SINK)
    assert code == 0 and BOB in err and "created" in out and len(bob_rules()) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no terminal again

    # mailbox set: turning a mailbox off asks; other changes do not.
    code, _, err = cli("mailbox", "set", f"dave@{DOMAIN}", "--enabled", "false")
    assert code == 2 and "Enabled" in err
    code, shown, _ = cli("mailbox", "show", f"dave@{DOMAIN}")
    assert not shown["fields"]["Enabled"]["override"]
    code, written, _ = cli("mailbox", "set", f"dave@{DOMAIN}", "--enabled", "false", "--yes")
    assert code == 0 and written["written"] == ["Enabled"]
    assert cli("mailbox", "set", f"dave@{DOMAIN}", "--enabled", "")[0] == 0  # back on: no question

    # poison replay --all: lists the queues and counts; --dry-run moves nothing.
    async def poison_one() -> None:
        container = Container(Settings(values(workdir)))
        try:
            sender = container.storage.queue_sender(INBOUND_QUEUE + "-poison")
            await sender.send('{"kind":"inbound","n":"dry"}')
            await sender.close()
        finally:
            await container.storage.close()

    asyncio.run(poison_one())
    code, dry, _ = cli("poison", "replay", "--all", "--queue", "inbound-mail", "--dry-run")
    assert code == 0 and dry["dry_run"] and "inbound-mail-poison" in dry["items"][0]
    code, _, err = cli("poison", "replay", "--all", "--queue", "inbound-mail")
    assert code == 2 and "--yes" in err
    code, listed, _ = cli("poison", "list", "inbound-mail")
    assert any('"dry"' in i["content"] for i in listed)
    code, replayed, _ = cli("poison", "replay", "--all", "--queue", "inbound-mail", "--yes")
    assert code == 0 and replayed["replayed"]


# ------------------------------------------------------------------------------------------------ diagnosis


def _send_from(stack: LocalStack, sender: str, to: str, subject: str) -> str:
    message = EmailMessage()
    message_id = f"<{uuid.uuid4().hex}@{sender.split('@')[1]}>"
    message["From"], message["To"], message["Subject"], message["Message-ID"] = sender, to, subject, message_id
    message.set_content("Hello")
    assert stack.graph.smtp_port is not None
    with smtplib.SMTP("127.0.0.1", stack.graph.smtp_port, timeout=30) as smtp:
        smtp.send_message(message)
    return message_id


def test_explain_finds_mail_by_what_users_see(cli: Any, stack: LocalStack, workdir: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from core.work_items import InboundItem

    assert cli("sync-crm")[0] == 0
    assert cli("mailbox", "set", ALICE, "--filter", "replies")[0] == 0  # a stranger's mail is not a reply: skipped
    support = f"support@{DOMAIN}"  # queue, filter all: tracked
    tag = uuid.uuid4().hex[:8]
    skipped_id = _send_from(stack, "nora@northwind.example", ALICE, f"Quarterly review {tag}")
    tracked_id = _send_from(stack, "fiona@fabrikam.example", support, f"Order {tag}")

    async def process() -> list[str]:
        container = Container(Settings(values(workdir)))
        try:
            alice_graph_id = await _graph_id(container, ALICE, skipped_id)
            support_graph_id = await _graph_id(container, support, tracked_id)
            sender = container.storage.queue_sender(INBOUND_QUEUE)
            for mailbox, graph_id in ((ALICE, alice_graph_id), (support, support_graph_id),
                                      (f"ghost@{DOMAIN}", f"ghost-{tag}")):  # not a configured mailbox
                await sender.send(InboundItem(mailbox, graph_id, "notification", folder="inbox").to_json())
            await sender.close()
            return await _drain_inbound(container)
        finally:
            await container.storage.close()
            await container.graph.close()

    outcomes = asyncio.run(process())
    assert "tracked" in outcomes and "skipped:filter:not_accepted" in outcomes and "skipped:mailbox:unknown" in outcomes

    # By mailbox + sender + subject (what the user can tell the admin), no Message-ID needed.
    code, found, err = cli("explain", "--mailbox", ALICE, "--from", "nora@", "--subject", f"review {tag}")
    assert code == 0 and len(found) == 1, err
    assert found[0]["explanation"].startswith("NOT TRACKED (filter: not_accepted)")
    assert found[0]["subject"] == f"Quarterly review {tag}" and found[0]["internetMessageId"] == skipped_id
    code, found, _ = cli("explain", "--subject", f"ORDER {tag}", "--since", "1h")  # case-insensitive contains
    assert code == 0 and [r["mailbox"] for r in found] == [support]
    assert found[0]["explanation"].startswith(f"TRACKED as email {found[0]['activityId']}")
    # By Message-ID, with or without the angle brackets.
    code, found, _ = cli("explain", skipped_id.strip("<>"))
    assert code == 0 and found[0]["mailbox"] == ALICE
    # A record made without an Internet Message-ID (mailbox not configured) is found by mailbox.
    code, found, _ = cli("explain", "--mailbox", f"ghost@{DOMAIN}")
    assert code == 0 and found[0]["explanation"].startswith("NOT TRACKED (mailbox: unknown)")
    # Narrowing that matches nothing is a failure with a hint, not an empty success.
    code, _, err = cli("explain", "--mailbox", ALICE, "--subject", f"no such {tag}")
    assert code == 1 and "no decision recorded" in err and "subscriptions list" in err

    # The text an admin reads: the decision trail, one step per line.
    code, text, _ = _plain(workdir, monkeypatch, capsys, "explain", "--mailbox", ALICE, "--subject", tag)
    assert code == 0 and "NOT TRACKED (filter: not_accepted)" in text and "nora@northwind.example" in text
    assert "skip_rule" in text and "filter" in text

    # skipped list: the reasons, filterable.
    code, skipped, _ = cli("skipped", "list", "--mailbox", ALICE, "--since", "1h")
    mine = [i for i in skipped["items"] if i["subject"] == f"Quarterly review {tag}"]
    assert code == 0 and len(mine) == 1 and mine[0]["reason"] == "not_accepted" and mine[0]["why"]
    assert skipped["by_reason"]["not_accepted"] >= 1
    code, only, _ = cli("skipped", "list", "--reason", "unknown", "--since", "1h")
    assert only["items"] and all(i["reason"] == "unknown" for i in only["items"])
    code, text, _ = _plain(workdir, monkeypatch, capsys, "skipped", "list", "--mailbox", ALICE)
    assert code == 0 and "not_accepted" in text and f"Quarterly review {tag}" in text

    # status: the last hour's counts and top skip reasons come from the same records.
    code, status, _ = cli("status")
    assert code == 0 and status["inbound"]["counts"]["tracked"] >= 1 and status["inbound"]["counts"]["skipped"] >= 2
    assert {"not_accepted", "unknown"} <= {r["reason"] for r in status["inbound"]["skip_reasons"]}


def test_mailbox_show_and_outbound_list_give_the_reasons(cli: Any, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime, timedelta

    from core.adapters.inbound_state import TableMailboxStatus
    from core.adapters.outbound_state import TableMailboxOutboundStatus, TableOutboundLedger
    from core.names import MAILBOX_STATUS_TABLE
    from core.services.outbound import ActiveMarker, LedgerEntry, Phase

    assert cli("sync-crm")[0] == 0
    failed_id, sent_id, active_id = (str(uuid.uuid4()) for _ in range(3))
    now = datetime.now(UTC)

    async def seed() -> None:
        # What the pipelines record (through their own adapters): an inbound and an outbound failure of alice, an
        # email that failed for good, one sent, one in flight.
        container = Container(Settings(values(workdir)))
        try:
            await TableMailboxStatus(container.storage.table(MAILBOX_STATUS_TABLE)).record_failure(
                ALICE, code="crm_rejected", reason="Dataverse 400 0x80040203", permanent=True)
            await TableMailboxOutboundStatus(container.storage).record_failure(
                ALICE, failed_id, "Graph 403 ErrorAccessDenied: mailbox outside the app's scope", now)
            ledger = TableOutboundLedger(container.storage)
            await ledger.put(LedgerEntry(failed_id, ALICE, Phase.FAILED, attempts=5, updated_at=now,
                                         last_error="Graph 403 ErrorAccessDenied: mailbox outside the app's scope",
                                         last_error_code="ErrorAccessDenied"), etag=None)
            await ledger.put(LedgerEntry(sent_id, BOB, Phase.DONE, attempts=1, updated_at=now - timedelta(hours=3)),
                             etag=None)
            await ledger.put(LedgerEntry(active_id, ALICE, Phase.RETRY, attempts=2, updated_at=now,
                                         last_error="Graph 429 throttled"), etag=None)
            await ledger.mark_active(ActiveMarker(active_id, ALICE, enqueued_at=now, updated_at=now))
        finally:
            await container.storage.close()

    asyncio.run(seed())
    code, text, _ = _plain(workdir, monkeypatch, capsys, "mailbox", "show", ALICE)
    assert code == 0 and "Dataverse 400 0x80040203" in text and "ErrorAccessDenied" in text
    assert "inbound" in text and "outbound" in text

    code, failed, _ = cli("outbound", "list", "--failed")
    by_id = {i["email_id"]: i for i in failed["items"]}
    assert code == 0 and failed_id in by_id and sent_id not in by_id and active_id not in by_id
    assert by_id[failed_id]["state"] == "failed" and "ErrorAccessDenied" in by_id[failed_id]["reason"]
    code, every, _ = cli("outbound", "list", "--since", "1d")
    states = {i["email_id"]: i["state"] for i in every["items"]}
    assert states[failed_id] == "failed" and states[sent_id] == "sent" and states[active_id] == "retry"
    code, bobs, _ = cli("outbound", "list", "--mailbox", BOB)
    assert [i["email_id"] for i in bobs["items"]] == [sent_id]
    code, narrow, _ = cli("outbound", "list", "--since", "1h", "--mailbox", BOB)
    assert narrow["items"] == []  # sent three hours ago: outside the window
    code, text, _ = _plain(workdir, monkeypatch, capsys, "outbound", "list", "--failed")
    assert code == 0 and failed_id in text and "failed" in text

    code, status, _ = cli("status")
    failures = {f["email_id"]: f for f in status["outbound"]["failures"]}
    assert failed_id in failures and "ErrorAccessDenied" in failures[failed_id]["reason"]
    assert status["outbound"]["in_flight"] >= 1


def test_tracked_folder_names_are_saved_as_folder_ids(cli: Any, stack: LocalStack) -> None:
    assert cli("sync-crm")[0] == 0
    stack.graph_emulator("POST", "seed", {"users": [{"userPrincipalName": ALICE, "folders": [
        {"displayName": "Projects", "parent": "inbox"}, {"displayName": "2026", "parent": "Projects"}]}]})
    store = stack.graph.store
    user = store.get_user(ALICE)
    assert user is not None
    inbox = store.folder(user.id, "inbox")
    assert inbox is not None
    projects = next(f for f in store.child_folders(user.id, inbox.id) if f.display_name == "Projects")
    year = next(f for f in store.child_folders(user.id, projects.id) if f.display_name == "2026")
    record = f"account:{uuid.uuid4()}"

    # Graph's mailFolders/{x} takes ids and well-known names only: names and paths are resolved when written
    code, written, err = cli("mailbox", "set", ALICE, "--folders",
                             json.dumps({"projects": record, "Inbox/Projects/2026": record}))
    assert code == 0, err
    assert set(written["effective"]["tracked_folders"]) == {projects.id, year.id}
    code, _, err = cli("mailbox", "set", ALICE, "--folders", json.dumps({"Nowhere": record}))
    assert code == 1 and "no folder named 'Nowhere'" in err
    code, _, err = cli("mailbox", "set", ALICE, "--folders", json.dumps({"Inbox": record}))
    assert code == 1 and "always tracked" in err
    code, shown, _ = cli("mailbox", "show", ALICE)
    assert set(shown["effective"]["tracked_folders"]) == {projects.id, year.id}  # refused writes changed nothing
    assert cli("mailbox", "set", ALICE, "--folders", "")[0] == 0


def test_reprocess_applies_a_filter_change_to_mail_skipped_before(cli: Any, stack: LocalStack, workdir: Path) -> None:
    """The issue's "skipped is final": an admin fixes a filter; `reprocess` decides the skipped mail again through the
    normal pipeline, once; tracked mail is never touched, and a second run finds nothing left to do."""
    from core.work_items import InboundItem

    assert cli("sync-crm")[0] == 0
    assert cli("mailbox", "set", ALICE, "--filter", "replies")[0] == 0
    tag = uuid.uuid4().hex[:8]
    message_id = _send_from(stack, "nora@northwind.example", ALICE, f"Prospect {tag}")

    async def notify_and_drain() -> list[str]:
        container = Container(Settings(values(workdir)))
        try:
            graph_id = await _graph_id(container, ALICE, message_id)
            sender = container.storage.queue_sender(INBOUND_QUEUE)
            await sender.send(InboundItem(ALICE, graph_id, "notification", folder="inbox").to_json())
            await sender.close()
            return await _drain_inbound(container)
        finally:
            await container.storage.close()
            await container.graph.close()

    assert "skipped:filter:not_accepted" in asyncio.run(notify_and_drain())
    assert _crm_emails(stack, message_id) == []

    code, written, _ = cli("mailbox", "set", ALICE, "--filter", "all")
    assert code == 0 and written["past_mail"] == f"emailrouter reprocess {ALICE} --since 7d"
    code, _, err = cli("reprocess", ALICE, "--since", "1h", "--from", "nora@")
    assert code == 2 and "--yes" in err  # a bulk change: asks first, refuses without a terminal
    code, dry, _ = cli("reprocess", ALICE, "--since", "1h", "--from", "nora@", "--dry-run")
    assert code == 0 and dry["dry_run"] and any(f"Prospect {tag}" in line for line in dry["items"])
    code, done, err = cli("reprocess", ALICE, "--since", "1h", "--from", "nora@", "--subject", tag, "--yes")
    assert code == 0 and done["enqueued"] == 1 and done["by_outcome"] == {"skipped:filter:not_accepted": 1}, err

    assert "tracked" in _drain_once(workdir)
    assert len(_crm_emails(stack, message_id)) == 1
    # The latest decision is "tracked" now: nothing to decide again, and a redelivered notification is a duplicate.
    code, again, _ = cli("reprocess", ALICE, "--since", "1h", "--subject", tag, "--yes")
    assert code == 0 and again["enqueued"] == 0 and again["items"] == []
    assert "duplicate_item" in asyncio.run(notify_and_drain())
    assert len(_crm_emails(stack, message_id)) == 1
    code, shown, _ = cli("explain", message_id)
    assert code == 0 and shown[0]["source"] == "reprocess" and shown[0]["outcome"] == "tracked"
    code, hint, _ = cli("settings", "set", "NeverLogDomains", "")
    assert code == 0 and hint["past_mail"] == "emailrouter reprocess --all --since 7d"
    assert cli("mailbox", "set", ALICE, "--filter", "")[0] == 0
