"""`emailrouter doctor` against the local stack (emulators + Azurite), in-process through ``core.cli.main``: it passes
on the documented org and fails, naming the cause, on variant orgs (optimistic concurrency off on email, a
relationship not declared, Server-Side Sync also active on a router mailbox); the sandbox leaves nothing behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.cli import main
from emulators.dataverse.seed import demo_user_id
from local.azurite import Azurite
from tests.unit.settings.localstack import DOMAIN, LocalStack, start_local_stack

pytestmark = pytest.mark.integration

SANDBOX_SUBJECT = "Email Router doctor sandbox (deleted automatically)"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, azurite: Azurite) -> Iterator[LocalStack]:
    yield from start_local_stack(tmp_path_factory.mktemp("tls"), azurite)


@pytest.fixture
def doctor(stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    (tmp_path / "local.settings.json").write_text(json.dumps({"IsEncrypted": False, "Values": stack.fresh_values()}))
    monkeypatch.chdir(tmp_path)
    for name in ("AzureWebJobsStorage", "TABLE_PREFIX", "GRAPH_BASE_URL", "DATAVERSE_URL"):
        monkeypatch.delenv(name, raising=False)

    def run(*argv: str) -> tuple[int, dict[str, Any]]:
        capsys.readouterr()
        code = main(["--json", "doctor", *argv])
        out = capsys.readouterr().out
        return code, json.loads(out)

    yield run
    variant(stack, {"reset": True})


def variant(stack: LocalStack, doc: dict[str, Any]) -> None:
    response = httpx.post(f"{stack.dataverse.url}/_emulator/variant", json=doc, verify=stack.ssl(), timeout=30)
    assert response.status_code == 200, response.text


def by_name(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["check"]: c for c in report["checks"]}


def failed(report: dict[str, Any]) -> dict[str, str]:
    return {c["check"]: c["detail"] for c in report["checks"] if c["outcome"] == "fail"}


def test_doctor_passes_on_the_documented_org_and_the_sandbox_cleans_up(stack: LocalStack, doctor: Any) -> None:
    code, report = doctor("--sandbox", "--mailbox", f"alice@{DOMAIN}")
    assert failed(report) == {} and code == 0 and report["ok"]
    checks = by_name(report)
    assert "ReceivingMailboxId_Email@odata.bind" in checks["bind email.receivingmailboxid -> mailbox"]["detail"]
    assert checks["optimistic concurrency on email"]["outcome"] == "pass"
    assert checks["prvReadActivity"]["outcome"] == "pass"
    assert checks["bind email.acceptingentityid -> queue"]["outcome"] == "warn"  # one name for two targets
    for step in ("bind email.receivingmailboxid -> mailbox", "bind email.correlatedactivityid -> email",
                 "activity parties (partyid_*)", "attachment (objectid -> email)", "queue item (objectid, queueid)",
                 "outbound: claim with If-Match", "outbound: stale ETag refused", "outbound: Sending -> Sent",
                 "cleanup"):
        assert any(c["check"] == step and c["outcome"] == "pass" and c["area"] == "sandbox"
                   for c in report["checks"]), step
    assert checks["Graph: chosen Message-ID kept"]["outcome"] == "pass"
    leftovers = stack.dv("GET", f"emails?$filter=subject eq '{SANDBOX_SUBJECT}'&$select=activityid").json()["value"]
    assert leftovers == []


def test_doctor_fails_naming_optimistic_concurrency_off(stack: LocalStack, doctor: Any) -> None:
    variant(stack, {"concurrency_off": ["email"]})
    code, report = doctor("--sandbox")
    assert code == 1
    problems = failed(report)
    assert "IsOptimisticConcurrencyEnabled = false" in problems["optimistic concurrency on email"]
    assert "0x8006088d" in problems["outbound: claim with If-Match"]
    assert by_name(report)["cleanup"]["outcome"] == "pass"


def test_doctor_fails_naming_a_relationship_the_org_does_not_declare(stack: LocalStack, doctor: Any) -> None:
    variant(stack, {"nav_renames": [{"entity": "email", "nav": "ReceivingMailboxId_Email", "to": ""}]})
    code, report = doctor()
    assert code == 1
    assert "email.receivingmailboxid -> mailbox" in failed(report)["bind email.receivingmailboxid -> mailbox"]


def test_a_renamed_relationship_is_reported_and_bound_by_its_new_name(stack: LocalStack, doctor: Any) -> None:
    variant(stack, {"nav_renames": [{"entity": "email", "nav": "CorrelatedActivityId_Email",
                                     "to": "correlatedactivityid_email"}]})
    code, report = doctor("--sandbox")
    renamed = next(c for c in report["checks"] if c["area"] == "metadata"
                   and c["check"] == "bind email.correlatedactivityid -> email")
    assert renamed["outcome"] == "warn" and "renamed in this org" in renamed["detail"]
    sandbox = [c for c in report["checks"] if c["area"] == "sandbox"
               and c["check"] == "bind email.correlatedactivityid -> email"]
    assert sandbox and sandbox[0]["outcome"] == "pass" and "correlatedactivityid_email" in sandbox[0]["detail"]
    assert code == 0


def test_doctor_fails_naming_a_mailbox_where_server_side_sync_also_sends(stack: LocalStack, doctor: Any) -> None:
    alice = demo_user_id("alice")
    mailbox = stack.dv("GET", f"systemusers({alice})?$select=_defaultmailbox_value").json()["_defaultmailbox_value"]
    profile = stack.dv("POST", "emailserverprofiles", {"name": "IMAP/SMTP server", "servertype": 4})
    profile_id = profile.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    seed = {"systemusers": [{"systemuserid": alice, "mailbox": {
        "_emailserverprofile_value": profile_id, "outgoingemailstatus": 1, "incomingemailstatus": 0}}]}
    response = httpx.post(f"{stack.dataverse.url}/_emulator/seed", json=seed, verify=stack.ssl(), timeout=30)
    assert response.status_code == 200, response.text
    try:
        code, report = doctor()
        assert code == 1
        problems = failed(report)
        assert f"alice@{DOMAIN} outgoing" in problems and "SSS sends its email too" in problems[f"alice@{DOMAIN} "
                                                                                                   "outgoing"]
        assert by_name(report)[f"alice@{DOMAIN} incoming"]["outcome"] == "warn"  # configured, not tested
    finally:
        reset = {"systemusers": [{"systemuserid": alice, "mailbox": {"_emailserverprofile_value": None,
                                                                      "outgoingemailstatus": 0}}]}
        httpx.post(f"{stack.dataverse.url}/_emulator/seed", json=reset, verify=stack.ssl(), timeout=30)
        del mailbox
