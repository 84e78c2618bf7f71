"""Pure OData helpers: literals, filters, query strings, paths and $batch encode/decode (reference §4, §5)."""

from __future__ import annotations

import datetime as dt
import email
import email.message
import email.policy
import json
import re
import uuid
from urllib.parse import parse_qs, unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.adapters.odata import (
    BatchDecodeError,
    BatchRequest,
    ChangeSet,
    and_,
    build_query,
    decode_batch_response,
    encode_batch,
    entity_path,
    eq,
    format_guid,
    in_,
    literal,
    or_,
    parse_entity_id,
)

GUID = "7eb682f1-ca75-e511-80d4-00155d2a68d1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("O'Bryan", "'O''Bryan'"),
        ("", "''"),
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (6, "6"),
        (1.5, "1.5"),
        (uuid.UUID(GUID), GUID),
        (dt.datetime(2026, 11, 20, 10, 15, tzinfo=dt.timezone(dt.timedelta(hours=1))), "2026-11-20T09:15:00Z"),
        (dt.date(2026, 1, 2), "2026-01-02"),
    ],
)
def test_literal(value: object, expected: str) -> None:
    assert literal(value) == expected


def test_literal_refuses_naive_datetimes_and_unknown_types() -> None:
    with pytest.raises(ValueError, match="naive"):
        literal(dt.datetime(2026, 1, 1))
    with pytest.raises(TypeError):
        literal(object())


def test_filters_compose_as_documented() -> None:
    # reference §4.2: contacts by any of three address columns.
    addr = "a+b@x.com"
    condition = or_(eq("emailaddress1", addr), eq("emailaddress2", addr), eq("emailaddress3", addr))
    assert condition == (
        "(emailaddress1 eq 'a+b@x.com') or (emailaddress2 eq 'a+b@x.com') or (emailaddress3 eq 'a+b@x.com')"
    )
    assert and_("statuscode eq 6", None, "") == "statuscode eq 6"
    assert and_("a eq 1", "b eq 2") == "(a eq 1) and (b eq 2)"
    assert in_("emailaddress1", ["a@x", "O'b@y"]) == (
        "Microsoft.Dynamics.CRM.In(PropertyName='emailaddress1',PropertyValues=['a@x','O''b@y'])"
    )


def test_build_query_percent_encodes_values_like_the_reference() -> None:
    query = build_query(
        select=["contactid", "fullname"],
        filter="emailaddress1 eq 'a+b@x.com'",
        orderby="fullname asc",
        top=5,
        expand="email_activity_parties($select=addressused)",
        count=True,
    )
    # reference §4.1: encode + & / ? @ = $ , : ; inside values; spaces never become '+'.
    assert "+" not in query
    assert "%2B" in query and "%40" in query and "%20" in query
    assert query.startswith("$select=contactid%2Cfullname&$filter=emailaddress1%20eq%20'a%2Bb%40x.com'")
    parsed = {k: v[0] for k, v in parse_qs(query).items()}
    assert unquote(query.split("&")[1].split("=", 1)[1]) == "emailaddress1 eq 'a+b@x.com'"
    assert parsed["$top"] == "5" and parsed["$count"] == "true" and parsed["$orderby"] == "fullname asc"
    assert build_query() == ""
    with pytest.raises(ValueError):
        build_query(top=-1)


@given(st.text())
def test_any_string_literal_survives_url_encoding(value: str) -> None:
    query = build_query(filter=eq("subject", value))
    decoded = unquote(query.split("=", 1)[1])
    assert decoded == f"subject eq '{value.replace(chr(39), chr(39) * 2)}'"
    assert "&" not in query.split("=", 1)[1] and "#" not in query


def test_entity_path_validates_names_and_ids() -> None:
    assert entity_path("emails") == "emails"
    assert entity_path("emails", GUID.upper()) == f"emails({GUID})"
    with pytest.raises(ValueError):
        entity_path("emails", "x) or (1")
    with pytest.raises(ValueError):
        entity_path("emails/../accounts")
    assert format_guid(uuid.UUID(GUID)) == GUID


def test_parse_entity_id_from_documented_header() -> None:
    url = f"[Org]/api/data/v9.2/accounts({GUID})"
    assert parse_entity_id(url) == GUID
    with pytest.raises(ValueError):
        parse_entity_id("https://org/api/data/v9.2/accounts")


# ------------------------------------------------------------------------------------------- $batch encode


def _strip_changeset_ids(text: str) -> str:
    return re.sub(r"changeset_[0-9a-f-]{36}", "changeset_X", text)


def test_encode_batch_matches_the_documented_part_shape() -> None:
    task = {
        "subject": "Task 1 in batch",
        "regardingobjectid_account_task@odata.bind": "accounts(00000000-0000-0000-0000-000000000001)",
    }
    content_type, body = encode_batch(
        [ChangeSet([BatchRequest("POST", "tasks", task)]), BatchRequest("GET", "tasks?$select=subject")],
        api_path="/api/data/v9.2",
        boundary="batch_AAA",
    )
    assert content_type == 'multipart/mixed; boundary="batch_AAA"'
    expected = (
        "--batch_AAA\r\n"
        'Content-Type: multipart/mixed; boundary="changeset_X"\r\n'
        "\r\n"
        "--changeset_X\r\n"
        "Content-Type: application/http\r\n"
        "Content-Transfer-Encoding: binary\r\n"
        "Content-ID: 1\r\n"
        "\r\n"
        "POST /api/data/v9.2/tasks HTTP/1.1\r\n"
        "Content-Type: application/json; type=entry\r\n"
        "\r\n"
        + json.dumps(task, separators=(",", ":"))
        + "\r\n--changeset_X--\r\n"
        "--batch_AAA\r\n"
        "Content-Type: application/http\r\n"
        "Content-Transfer-Encoding: binary\r\n"
        "\r\n"
        "GET /api/data/v9.2/tasks?$select=subject HTTP/1.1\r\n"
        "\r\n"
        "\r\n--batch_AAA--\r\n"
    )
    assert _strip_changeset_ids(body.decode()) == expected


def test_encoded_batch_is_valid_mime_for_an_independent_parser() -> None:
    content_type, body = encode_batch(
        [
            ChangeSet([
                BatchRequest("POST", "contacts", {"lastname": "Ünïcode"}, content_id="1"),
                BatchRequest("PATCH", "$1", {"firstname": "Jo"}, content_id="2"),
            ]),
            BatchRequest("GET", "WhoAmI"),
        ],
        api_path="/api/data/v9.2",
        common_headers={"CallerObjectId": GUID},
    )
    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP
    )
    outer = list(message.iter_parts())
    assert len(outer) == 2
    changeset = list(outer[0].iter_parts())

    def payload(part: email.message.Message) -> str:
        raw = part.get_payload(decode=True)
        assert isinstance(raw, bytes)
        return raw.decode("utf-8")

    assert [p["Content-ID"] for p in changeset] == ["1", "2"]
    first = payload(changeset[0])
    assert first.startswith("POST /api/data/v9.2/contacts HTTP/1.1\r\n")
    assert f"CallerObjectId: {GUID}" in first
    assert first.endswith('{"lastname":"Ünïcode"}')
    second = payload(changeset[1])
    assert second.startswith("PATCH $1 HTTP/1.1")  # Content-ID reference left as is
    assert payload(outer[1]).startswith("GET /api/data/v9.2/WhoAmI HTTP/1.1")


def test_change_sets_refuse_get_and_batches_refuse_over_1000_operations() -> None:
    with pytest.raises(ValueError, match="GET"):
        ChangeSet([BatchRequest("GET", "emails")])
    with pytest.raises(ValueError, match="1000"):
        encode_batch([BatchRequest("GET", "WhoAmI")] * 1001, api_path="/api/data/v9.2")
    with pytest.raises(ValueError):
        encode_batch([], api_path="/api/data/v9.2")


def test_absolute_urls_are_kept() -> None:
    _, body = encode_batch([BatchRequest("GET", "https://org.example/api/data/v9.2/leads")], api_path="/api/data/v9.2")
    assert b"GET https://org.example/api/data/v9.2/leads HTTP/1.1" in body


@pytest.mark.parametrize(
    ("method", "headers", "idempotent", "safe"),
    [
        ("GET", {}, False, True),
        ("DELETE", {}, False, True),
        ("PATCH", {}, False, True),
        ("PATCH", {"If-Match": "*"}, False, True),
        ("PATCH", {"if-match": 'W/"12"'}, False, False),
        ("POST", {}, False, False),
        ("POST", {}, True, True),
    ],
)
def test_safe_to_repeat(method: str, headers: dict[str, str], idempotent: bool, safe: bool) -> None:
    assert BatchRequest(method, "emails", headers=headers, idempotent=idempotent).safe_to_repeat is safe


# ------------------------------------------------------------------------------------------- $batch decode

# Shaped after the documented response (reference §5): batchresponse/changesetresponse boundaries, a 204
# create with Location + OData-EntityId and echoed Content-ID, then a GET answered 200 with JSON.
DOCUMENTED_RESPONSE = (
    "--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f\r\n"
    "Content-Type: multipart/mixed; boundary=changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc\r\n"
    "\r\n"
    "--changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc\r\n"
    "Content-Type: application/http\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "Content-ID: 1\r\n"
    "\r\n"
    "HTTP/1.1 204 No Content\r\n"
    "OData-Version: 4.0\r\n"
    "Location: [Org]/api/data/v9.2/tasks(a59c24f3-fafc-e411-80dd-00155d2a68cb)\r\n"
    "OData-EntityId: [Org]/api/data/v9.2/tasks(a59c24f3-fafc-e411-80dd-00155d2a68cb)\r\n"
    "\r\n"
    "\r\n"
    "--changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc\r\n"
    "Content-Type: application/http\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "Content-ID: 2\r\n"
    "\r\n"
    "HTTP/1.1 204 No Content\r\n"
    "OData-Version: 4.0\r\n"
    "Location: [Org]/api/data/v9.2/tasks(a69c24f3-fafc-e411-80dd-00155d2a68cb)\r\n"
    "OData-EntityId: [Org]/api/data/v9.2/tasks(a69c24f3-fafc-e411-80dd-00155d2a68cb)\r\n"
    "\r\n"
    "\r\n"
    "--changesetresponse_ff83b4f1-ab48-430c-b81c-926a2c596abc--\r\n"
    "--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f\r\n"
    "Content-Type: application/http\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "\r\n"
    "HTTP/1.1 200 OK\r\n"
    "Content-Type: application/json; odata.metadata=minimal; odata.streaming=true\r\n"
    "OData-Version: 4.0\r\n"
    "\r\n"
    '{"@odata.context":"[Org]/api/data/v9.2/$metadata#tasks(subject)",'
    '"value":[{"@odata.etag":"W/\\"1\\"","subject":"Task 1"}]}\r\n'
    "--batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f--\r\n"
)


def test_decode_documented_batch_response() -> None:
    parts = decode_batch_response(
        "multipart/mixed; boundary=batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f",
        DOCUMENTED_RESPONSE.encode(),
    )
    assert [(p.status, p.content_id, p.in_changeset) for p in parts] == [
        (204, "1", 0), (204, "2", 0), (200, None, None),
    ]
    assert parts[0].entity_id == "a59c24f3-fafc-e411-80dd-00155d2a68cb"
    assert parts[1].entity_id == "a69c24f3-fafc-e411-80dd-00155d2a68cb"
    assert parts[0].json() is None and parts[0].ok
    assert parts[2].json()["value"][0]["subject"] == "Task 1"
    assert parts[2].headers["content-type"].startswith("application/json")


def test_decode_documented_error_response_and_bare_lf() -> None:
    # reference §5 "Errors": the failing request's response is all the body holds.
    body = (
        "--batchresponse_e1\n"
        "Content-Type: application/http\n"
        "Content-Transfer-Encoding: binary\n"
        "\n"
        "HTTP/1.1 400 Bad Request\n"
        "REQ_ID: 5ecd1cb3-1730-4ffc-909c-d44c22270026\n"
        "Content-Type: application/json; odata.metadata=minimal\n"
        "OData-Version: 4.0\n"
        "\n"
        '{"error":{"code":"0x80044331","message":"A validation error occurred."}}\n'
        "--batchresponse_e1--\n"
    )
    [part] = decode_batch_response('multipart/mixed; boundary="batchresponse_e1"', body.encode())
    assert part.status == 400 and not part.ok
    assert part.headers["req_id"] == "5ecd1cb3-1730-4ffc-909c-d44c22270026"
    assert part.json()["error"]["code"] == "0x80044331"


def test_decode_rejects_garbage() -> None:
    with pytest.raises(BatchDecodeError):
        decode_batch_response("application/json", b"{}")
    with pytest.raises(BatchDecodeError):
        decode_batch_response("multipart/mixed; boundary=b", b"no delimiter here")
    with pytest.raises(BatchDecodeError):
        decode_batch_response(
            "multipart/mixed; boundary=b", b"--b\r\nContent-Type: application/http\r\n\r\nnot http\r\n--b--"
        )
