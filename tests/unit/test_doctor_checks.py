"""The pure checks of `emailrouter doctor` (core/cli/doctor.py) with plain data."""

from __future__ import annotations

import uuid

from core.cli.doctor import (
    REQUIRED_PRIVILEGES,
    Outcome,
    metadata_checks,
    privilege_checks,
    settings_checks,
    sss_checks,
)
from core.domain.org_schema import DOCUMENTED, OrgSchema, Relationship
from core.settings.crm_sync import crm_mailboxes


def outcomes(checks: list) -> dict[str, Outcome]:  # type: ignore[type-arg]
    return {c.name: c.outcome for c in checks}


def test_the_documented_org_passes_every_metadata_check_but_the_ambiguous_accepting_entity() -> None:
    checks = outcomes(metadata_checks(DOCUMENTED))
    assert checks["entity sets"] is Outcome.PASS
    assert checks["optimistic concurrency on email"] is Outcome.PASS
    assert checks["bind email.receivingmailboxid -> mailbox"] is Outcome.PASS
    assert checks["bind queueitem.objectid -> email"] is Outcome.PASS
    assert {n for n, o in checks.items() if o is not Outcome.PASS} == {
        "bind email.acceptingentityid -> systemuser", "bind email.acceptingentityid -> queue"}


def test_a_missing_relationship_a_rename_and_concurrency_off_are_named() -> None:
    email = tuple(r for r in DOCUMENTED.relationships["email"] if r.referencing_attribute != "receivingmailboxid")
    email = tuple(Relationship(r.schema_name, r.referencing_attribute, r.referenced_entity, "Parent_Email")
                  if r.referencing_attribute == "parentactivityid" else r for r in email)
    schema = OrgSchema(entity_sets={k: v for k, v in DOCUMENTED.entity_sets.items() if k != "queueitem"},
                       relationships={**DOCUMENTED.relationships, "email": email},
                       optimistic_concurrency={"email": False}, from_org=True)
    checks = {c.name: c for c in metadata_checks(schema)}
    assert checks["entity sets"].outcome is Outcome.FAIL and "queueitem" in checks["entity sets"].detail
    assert checks["bind email.receivingmailboxid -> mailbox"].outcome is Outcome.FAIL
    renamed = checks["bind email.parentactivityid -> email"]
    assert renamed.outcome is Outcome.WARN and "Parent_Email" in renamed.detail
    assert checks["optimistic concurrency on email"].outcome is Outcome.FAIL
    assert "0x8006088d" in checks["optimistic concurrency on email"].detail


def test_privileges_by_name_and_depth() -> None:
    everything = [{"PrivilegeName": r.privilege, "Depth": "Global"} for r in REQUIRED_PRIVILEGES]
    assert all(c.outcome is Outcome.PASS for c in privilege_checks(everything))
    partial = [p for p in everything if p["PrivilegeName"] not in ("prvWriteActivity", "prvCreateContact")]
    partial.append({"PrivilegeName": "prvWriteActivity", "Depth": "Basic"})
    checks = {c.name: c for c in privilege_checks(partial)}
    assert checks["prvWriteActivity"].outcome is Outcome.FAIL and "Basic" in checks["prvWriteActivity"].detail
    assert checks["prvCreateContact"].outcome is Outcome.WARN  # an optional feature
    assert checks["prvCreateActivity"].outcome is Outcome.PASS


def test_unresolved_key_vault_references_are_named() -> None:
    ok = settings_checks({"GRAPH_CLIENT_SECRET": "s3cret"})
    assert [c.outcome for c in ok] == [Outcome.PASS]
    bad = settings_checks({"GRAPH_CLIENT_SECRET": "@Microsoft.KeyVault(SecretUri=https://v.vault.azure.net/s/x)",
                           "TABLE_PREFIX": "er"})
    assert bad[0].outcome is Outcome.FAIL and "GRAPH_CLIENT_SECRET" in bad[0].detail
    assert "vault.azure.net" not in bad[0].detail  # the reference text is not repeated
    assert settings_checks(None)[0].outcome is Outcome.SKIP


def test_server_side_sync_findings() -> None:
    uid, mid, profile = (str(uuid.uuid4()) for _ in range(3))
    users = [{"systemuserid": uid, "internalemailaddress": "alice@x.example", "incomingemaildeliverymethod": 2,
              "outgoingemaildeliverymethod": 2, "_defaultmailbox_value": mid}]
    mailboxes = [{"mailboxid": mid, "statecode": 0, "incomingemaildeliverymethod": 2, "outgoingemaildeliverymethod": 2,
                  "enabledforincomingemail": True, "enabledforoutgoingemail": True, "incomingemailstatus": 0,
                  "outgoingemailstatus": 1, "_emailserverprofile_value": profile}]
    found, _ = crm_mailboxes(users, [], mailboxes, [])
    checks = {c.name: c.outcome for c in sss_checks(found)}
    assert checks == {"alice@x.example outgoing": Outcome.FAIL, "alice@x.example incoming": Outcome.WARN}
    clean, _ = crm_mailboxes(users, [], [{**mailboxes[0], "_emailserverprofile_value": None}], [])
    assert [c.outcome for c in sss_checks(clean)] == [Outcome.PASS]
