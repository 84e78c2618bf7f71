"""The emulator's schema data is what extract.py makes of the stored reference pages, and the emulator uses it."""

from __future__ import annotations

import json

from emulators.dataverse.reference import extract
from emulators.dataverse.schema import ENTITIES, REFERENCE_DIR


def test_committed_json_matches_the_pages() -> None:
    assert extract.main(["--check"]) == 0


def test_every_table_records_its_source_page_and_commit() -> None:
    sources = json.loads((REFERENCE_DIR / "sources.json").read_text())["tables"]
    for table, src in sources.items():
        assert src["repo"] == "MicrosoftDocs/powerapps-docs"
        assert src["path"].endswith(f"reference/entities/{table}.md")
        assert len(src["commit"]) == 40


def test_both_page_layouts_parse() -> None:
    current = extract.parse_page(
        "## Properties\n\n| **EntitySetName** | `emails`|\n| **LogicalName** | `email` |\n\n"
        "## Writable columns/attributes\n\n- [Subject](#BKMK_Subject)\n\n"
        '### <a name="BKMK_Subject"></a> Subject\n\n|Property|Value|\n|---|---|\n|LogicalName|`subject`|\n'
        "|Type|String|\n|MaxLength|800|\n\n## Many-to-One relationships\n\n"
        '### <a name="BKMK_m"></a> mailbox_email_ReceivingMailboxId\n\n|Property|Value|\n|---|---|\n'
        "|ReferencedEntity|`mailbox`|\n|ReferencingAttribute|`receivingmailboxid`|\n"
        "|ReferencingEntityNavigationPropertyName|`ReceivingMailboxId_Email`|\n")
    older = extract.parse_page(
        "## Properties\n\n|Property|Value|\n|--------|-----|\n|EntitySetName|mailboxes|\n|LogicalName|mailbox|\n\n"
        "## Writable columns/attributes\n\n- [StateCode](#BKMK_StateCode)\n\n"
        '### <a name="BKMK_StateCode"></a> StateCode\n\n|Property|Value|\n|--------|-----|\n'
        "|IsValidForCreate|False|\n|LogicalName|statecode|\n|Type|State|\n\n#### StateCode Choices/Options\n\n"
        "|Value|Label|DefaultStatus|InvariantName|\n|-----|-----|-------------|-------------|\n|0|Active|1|Active|\n")
    email = extract.table_schema(current, {"repo": "r", "path": "p", "commit": "c"})
    assert email["entity_set_name"] == "emails" and email["columns"]["subject"]["max_length"] == 800
    assert email["many_to_one"][0]["navigation_property"] == "ReceivingMailboxId_Email"
    mailbox = extract.table_schema(older, {"repo": "r", "path": "p", "commit": "c"})
    state = mailbox["columns"]["statecode"]
    assert (state["valid_for_create"], state["valid_for_update"], state["default_status"]) == (False, True, {"0": 1})


def test_emulator_uses_the_reference_names_and_limits() -> None:
    email = ENTITIES["email"]
    assert email.source is not None and email.source["path"].endswith("entities/email.md")
    assert email.navs["ReceivingMailboxId_Email"].column == "receivingmailboxid"
    assert "receivingmailboxid" not in email.navs and "ownerid" not in email.navs
    assert email.navs["acceptingentityid"].relationships == ("email_acceptingentity_queue",
                                                            "email_acceptingentity_systemuser")
    assert email.columns["senton"].read_only and not email.columns["isduplicatesenderunresolved"].read_only
    assert ENTITIES["mailbox"].columns["lastsyncerror"].max_length == 2048
    assert ENTITIES["mailbox"].columns["transientfailurecount"].read_only
    assert ENTITIES["activitymimeattachment"].navs["objectid_email"].targets == ("email",)
