"""The emulator's schema data is what extract.py makes of the stored reference pages, and the emulator uses it."""

from __future__ import annotations

import json

from emulators.dataverse.reference import extract
from emulators.dataverse.schema import ENTITIES, REFERENCE_DIR


def test_committed_json_matches_the_pages() -> None:
    assert extract.main(["--check"]) == 0


_PAGE_HOMES = {
    "MicrosoftDocs/powerapps-docs": "powerapps-docs/developer/data-platform/reference/entities/",
    "MicrosoftDocs/dynamics-365-customer-engagement": "ce/developer/reference/entities/",
}


def test_every_table_records_its_source_page_and_commit() -> None:
    sources = json.loads((REFERENCE_DIR / "sources.json").read_text())["tables"]
    for table, src in sources.items():
        for page in (src, *src.get("supplements", [])):
            assert page["path"] == _PAGE_HOMES[page["repo"]] + f"{table}.md"
            assert len(page["commit"]) == 40
        for sup in src.get("supplements", []):
            assert (REFERENCE_DIR / "pages" / sup["page"]).is_file()


def test_every_emulated_table_comes_from_a_page() -> None:
    """No hand-written tables: every entity the emulator serves names its reference page."""
    for name, ent in ENTITIES.items():
        assert ent.source is not None, name
        assert ent.source["path"].endswith(f"entities/{name}.md")
    assert {"account", "systemuser", "organization", "businessunit", "team", "emailserverprofile", "lead",
            "opportunity", "incident"} <= set(ENTITIES)


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


def test_supplements_merge_relationships_and_targets() -> None:
    base = extract.parse_page(
        "## Properties\n\n|EntitySetName|activityparties|\n|LogicalName|activityparty|\n\n"
        "## Writable columns/attributes\n\n- [PartyId](#BKMK_PartyId)\n\n"
        '### <a name="BKMK_PartyId"></a> PartyId\n\n|LogicalName|partyid|\n|Targets|account,contact|\n'
        "|Type|Lookup|\n")
    d365 = extract.parse_page(
        "## Customized columns/attributes\n\n"
        '### <a name="BKMK_PartyId"></a> PartyId\n\n|Targets|lead, opportunity|\n\n'
        "## Many-to-One relationships\n\n"
        '### <a name="BKMK_lead_activity_parties"></a> lead_activity_parties\n\n'
        "|ReferencedEntity|`lead`|\n|ReferencedAttribute|`leadid`|\n|ReferencingAttribute|`partyid`|\n"
        "|ReferencingEntityNavigationPropertyName|`partyid_lead`|\n\n"
        '### <a name="BKMK_x"></a> campaignactivity_activityparties\n\n'
        "|ReferencedEntity|`campaignactivity`|\n|ReferencingAttribute|`activityid`|\n"
        "|ReferencingEntityNavigationPropertyName|`activityid_campaignactivity`|\n")
    sup = {"repo": "r2", "path": "p2", "commit": "c2"}
    schema = extract.table_schema(base, {"repo": "r", "path": "p", "commit": "c", "columns": ["partyid"]},
                                  [(d365, sup)])
    assert schema["columns"]["partyid"]["targets"] == ["account", "contact", "lead", "opportunity"]
    # only relationships of carried columns (activityid is not selected)
    assert [r["navigation_property"] for r in schema["many_to_one"]] == ["partyid_lead"]
    assert schema["supplements"] == [sup]


def test_d365_and_newer_pages_give_the_names_the_overlay_used_to_guess() -> None:
    party = ENTITIES["activityparty"].navs
    for table in ("account", "contact", "systemuser", "queue", "lead", "opportunity", "incident"):
        assert party[f"partyid_{table}"].targets == (table,)
    email = ENTITIES["email"].navs
    for table in ("lead", "opportunity", "incident"):
        assert email[f"regardingobjectid_{table}_email"].column == "regardingobjectid"
    assert ENTITIES["queueitem"].navs["objectid_email"].targets == ("email",)
    assert ENTITIES["contact"].navs["parentcustomerid_account"].targets == ("account",)
    overlay = json.loads((REFERENCE_DIR / "overlay.json").read_text())["tables"]
    assert not any("extra_many_to_one" in t or "extra_targets" in t for t in overlay.values())


def test_queue_item_title_and_new_tables_limits() -> None:
    assert ENTITIES["queueitem"].columns["title"].max_length == 850
    assert ENTITIES["systemuser"].columns["isemailaddressapprovedbyo365admin"].read_only
    assert ENTITIES["systemuser"].columns["fullname"].read_only
    assert ENTITIES["account"].columns["name"].max_length == 160
    assert ENTITIES["organization"].columns["trackingprefix"].max_length == 256
    assert not ENTITIES["organization"].creatable
    assert ENTITIES["incident"].state_status[1] == (5, (5, 1000))
    assert ENTITIES["opportunity"].navs["customerid_contact"].targets == ("contact",)
