"""$filter tokenizer/parser as a table of cases, plus compile-and-run against the SQLite store."""

from __future__ import annotations

import pytest

from emulators.dataverse.errors import DataverseError
from emulators.dataverse.odata import (
    And,
    Cmp,
    Func,
    In,
    Lambda,
    Literal,
    Not,
    Or,
    Prop,
    parse_expand,
    parse_filter,
    parse_orderby,
    parse_prefer,
)
from emulators.dataverse.query import run_query
from emulators.dataverse.schema import ENTITIES
from emulators.dataverse.service import Caller, Dataverse
from emulators.dataverse.store import Store

S = lambda v: Literal(v, "string")  # noqa: E731
P = lambda *p: Prop(tuple(p))  # noqa: E731
GUID = "4026be43-6b69-e111-8f65-78e7d1620f5e"

PARSE_CASES = [
    ("subject eq 'x'", Cmp("eq", P("subject"), S("x"))),
    ("lastname eq 'O''Bryan'", Cmp("eq", P("lastname"), S("O'Bryan"))),
    ("statuscode eq 6", Cmp("eq", P("statuscode"), Literal(6, "int"))),
    ("effort ge -1.5", Cmp("ge", P("effort"), Literal(-1.5, "decimal"))),
    ("directioncode eq false", Cmp("eq", P("directioncode"), Literal(False, "bool"))),
    ("_ownerid_value eq null", Cmp("eq", P("_ownerid_value"), Literal(None, "null"))),
    (f"_ownerid_value eq {GUID.upper()}", Cmp("eq", P("_ownerid_value"), Literal(GUID, "guid"))),
    ("modifiedon gt 2026-11-20T09:15:00Z",
     Cmp("gt", P("modifiedon"), Literal("2026-11-20T09:15:00Z", "datetime"))),
    ("modifiedon lt 2026-11-20T10:15:00+01:00",
     Cmp("lt", P("modifiedon"), Literal("2026-11-20T09:15:00Z", "datetime"))),
    # precedence: and binds tighter than or; not tighter than and
    ("a eq 1 or b eq 2 and c eq 3",
     Or(Cmp("eq", P("a"), Literal(1, "int")),
        And(Cmp("eq", P("b"), Literal(2, "int")), Cmp("eq", P("c"), Literal(3, "int"))))),
    ("(a eq 1 or b eq 2) and c eq 3",
     And(Or(Cmp("eq", P("a"), Literal(1, "int")), Cmp("eq", P("b"), Literal(2, "int"))),
         Cmp("eq", P("c"), Literal(3, "int")))),
    ("not contains(subject,'x') and a eq 1",
     And(Not(Func("contains", (P("subject"), S("x")))), Cmp("eq", P("a"), Literal(1, "int")))),
    ("startswith(fullname, 'Al')", Func("startswith", (P("fullname"), S("Al")))),
    ("Microsoft.Dynamics.CRM.In(PropertyName='statuscode',PropertyValues=['6','7'])",
     In(P("statuscode"), (S("6"), S("7")))),
    ("Microsoft.Dynamics.CRM.NotIn(PropertyName='statuscode',PropertyValues=['1'])",
     In(P("statuscode"), (S("1"),), negate=True)),
    ("statuscode in (6,7)", In(P("statuscode"), (Literal(6, "int"), Literal(7, "int")))),
    ("email_activity_parties/any(p:p/addressused eq 'a+b@x.com')",
     Lambda("any", "email_activity_parties", "p", Cmp("eq", P("p", "addressused"), S("a+b@x.com")))),
    ("email_activity_parties/any()", Lambda("any", "email_activity_parties", None, None)),
    ("email_activity_parties/all(p: p/participationtypemask le 4)",
     Lambda("all", "email_activity_parties", "p", Cmp("le", P("p", "participationtypemask"), Literal(4, "int")))),
    ("statuscode eq 6 and email_activity_parties/any(p:p/participationtypemask eq 1 and p/_partyid_value eq "
     f"{GUID})",
     And(Cmp("eq", P("statuscode"), Literal(6, "int")),
         Lambda("any", "email_activity_parties", "p",
                And(Cmp("eq", P("p", "participationtypemask"), Literal(1, "int")),
                    Cmp("eq", P("p", "_partyid_value"), Literal(GUID, "guid")))))),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES, ids=[c[0][:60] for c in PARSE_CASES])
def test_parse_filter(text: str, expected: object) -> None:
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("lastname eq 'O'Bryan'", "There is an unterminated literal at position 21 in 'lastname eq 'O'Bryan''."),
        ("subject eq", "Syntax error"),
        ("(subject eq 'x'", "expected )"),
        ("subject eq 'x' foo", "unexpected 'foo'"),
        ("subject ~ 'x'", "unexpected character '~'"),
        ("frobnicate(subject,'x')", "unknown function"),
    ],
)
def test_parse_errors(text: str, fragment: str) -> None:
    with pytest.raises(DataverseError) as exc:
        parse_filter(text)
    assert exc.value.status == 400
    assert fragment in exc.value.message


def test_options_parsing() -> None:
    items = parse_expand("email_activity_parties($select=addressused,participationtypemask;"
                         "$filter=participationtypemask eq 1),regardingobjectid_contact_email($select=fullname)")
    assert [i.nav for i in items] == ["email_activity_parties", "regardingobjectid_contact_email"]
    assert items[0].options == {"$select": "addressused,participationtypemask", "$filter": "participationtypemask eq 1"}
    assert [(o.key, o.desc) for o in parse_orderby("modifiedon desc, subject")] == [("modifiedon", True),
                                                                                      ("subject", False)]
    prefer = parse_prefer(['odata.maxpagesize=50, odata.include-annotations="*", return=representation'])
    assert (prefer.maxpagesize, prefer.annotations, prefer.return_representation) == (50, ("*",), True)


# ---- compile and run against the store ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dv() -> Dataverse:
    from emulators.dataverse.seed import apply_seed, demo_seed

    d = Dataverse(Store())
    apply_seed(d, demo_seed())
    caller = Caller(user_id="00000000-0000-4000-8000-00000000c0de")
    rows = [
        ("Weekly report", "a@x.example", 1, "2026-01-01T00:00:00Z"),
        ("Re: weekly REPORT", "b@x.example", 6, "2026-01-02T00:00:00Z"),
        ("Invoice", "A+B@x.example", 6, "2026-01-03T00:00:00Z"),
        ("Überraschung", "c@x.example", 4, None),
    ]
    for subject, addr, status, end in rows:
        body: dict[str, object] = {"subject": subject, "email_activity_parties": [
            {"participationtypemask": 1, "addressused": addr}, {"participationtypemask": 2, "addressused": "z@y"}]}
        if end:
            body["actualend"] = end
        rid = d.create_record(ENTITIES["email"], body, caller, {})
        if status != 1:
            row = d.store.get(ENTITIES["email"], rid)
            assert row is not None
            row["statecode"], row["statuscode"] = 1, status
            d.store.replace(ENTITIES["email"], rid, row)
    return d


QUERY_CASES = [
    ("subject eq 'WEEKLY report'", ["Weekly report"]),
    ("contains(subject,'report')", ["Weekly report", "Re: weekly REPORT"]),
    ("startswith(subject,'re:')", ["Re: weekly REPORT"]),
    ("endswith(subject,'ICE')", ["Invoice"]),
    ("subject eq 'überraschung'", ["Überraschung"]),
    ("statuscode eq 6", ["Re: weekly REPORT", "Invoice"]),
    ("statuscode ne 6", ["Weekly report", "Überraschung"]),
    ("not (statuscode eq 6)", ["Weekly report", "Überraschung"]),
    ("Microsoft.Dynamics.CRM.In(PropertyName='statuscode',PropertyValues=['1','4'])",
     ["Weekly report", "Überraschung"]),
    ("actualend eq null", ["Überraschung"]),
    ("actualend ge 2026-01-02", ["Re: weekly REPORT", "Invoice"]),
    ("email_activity_parties/any(p:p/addressused eq 'a+b@X.EXAMPLE')", ["Invoice"]),
    ("email_activity_parties/any(p:p/participationtypemask eq 1 and contains(p/addressused,'b'))",
     ["Re: weekly REPORT", "Invoice"]),
    ("email_activity_parties/all(p:p/participationtypemask le 2)",
     ["Weekly report", "Re: weekly REPORT", "Invoice", "Überraschung"]),
    ("contains(subject,'%') or contains(subject,'_')", []),
]


@pytest.mark.parametrize(("text", "subjects"), QUERY_CASES, ids=[c[0][:60] for c in QUERY_CASES])
def test_filter_runs(dv: Dataverse, text: str, subjects: list[str]) -> None:
    res = run_query(dv.store, ENTITIES["email"], where=parse_filter(text))
    assert [r["subject"] for r in res.rows] == subjects


def test_filter_type_and_property_errors(dv: Dataverse) -> None:
    with pytest.raises(DataverseError) as exc:
        run_query(dv.store, ENTITIES["email"], where=parse_filter("Subject eq 'x'"))
    assert exc.value.message == "Could not find a property named 'Subject' on type 'Microsoft.Dynamics.CRM.email'."
    with pytest.raises(DataverseError) as exc:
        run_query(dv.store, ENTITIES["email"], where=parse_filter("statuscode eq 'six'"))
    assert "incompatible types" in exc.value.message


def test_keyset_paging_walks_every_row_once_in_order(dv: Dataverse) -> None:
    ent = ENTITIES["email"]
    first = run_query(dv.store, ent, order=parse_orderby("subject desc"), limit=2)
    assert len(first.rows) == 2
    assert first.next_token
    seen = [r["subject"] for r in first.rows]
    token = first.next_token
    while token:
        page = run_query(dv.store, ent, order=parse_orderby("subject desc"), limit=2, skiptoken=token)
        seen += [r["subject"] for r in page.rows]
        token = page.next_token
    assert sorted(seen, key=str.casefold, reverse=True) == seen
    assert len(seen) == len(set(seen)) == 4
