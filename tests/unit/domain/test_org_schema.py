"""OrgSchema: the router binds only the names the org declares."""

from __future__ import annotations

import uuid

from core.domain.org_schema import BINDS, DOCUMENTED, OrgSchema, Relationship


def test_documented_names_come_from_the_entity_reference() -> None:
    assert DOCUMENTED.nav("email", "receivingmailboxid", "mailbox") == "ReceivingMailboxId_Email"
    assert DOCUMENTED.nav("email", "correlatedactivityid", "email") == "CorrelatedActivityId_Email"
    assert DOCUMENTED.nav("email", "ownerid", "systemuser") == "ownerid_email"
    assert DOCUMENTED.nav("email", "ownerid", "team") == "ownerid_email"
    assert DOCUMENTED.nav("email", "regardingobjectid", "contact") == "regardingobjectid_contact_email"
    assert DOCUMENTED.nav("activitymimeattachment", "objectid", "email") == "objectid_email"
    assert DOCUMENTED.nav("contact", "ownerid", "systemuser") == "ownerid"


def test_one_name_for_two_targets_is_ambiguous_and_not_bound() -> None:
    assert DOCUMENTED.nav("email", "acceptingentityid", "systemuser") is None
    assert DOCUMENTED.nav("email", "acceptingentityid", "queue") is None
    single = OrgSchema(relationships={"email": (
        Relationship("email_acceptingentity_queue", "acceptingentityid", "queue", "acceptingentityid_queue"),
        Relationship("email_acceptingentity_systemuser", "acceptingentityid", "systemuser",
                     "acceptingentityid_systemuser"))})
    assert single.nav("email", "acceptingentityid", "queue") == "acceptingentityid_queue"


def test_undeclared_relationships_are_reported_not_guessed() -> None:
    bare = OrgSchema(relationships={"email": ()}, entity_sets={"email": "emails"})
    assert bare.nav("email", "receivingmailboxid", "mailbox") is None
    assert {(w.entity, w.attribute) for w in bare.missing()} >= {("email", "receivingmailboxid")}
    assert bare.bind_path("campaignactivity", uuid.UUID(int=1)) is None  # no guessed "<logical>s" entity set
    assert DOCUMENTED.missing(BINDS) == []
    # only the optional acceptingentityid binds are missing on a documented org
    assert {(w.attribute, w.target) for w in DOCUMENTED.missing(BINDS, include_optional=True)} == {
        ("acceptingentityid", "systemuser"), ("acceptingentityid", "queue")}
