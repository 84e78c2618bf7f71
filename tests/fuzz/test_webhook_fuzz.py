"""Fuzzing the Graph webhook HTTP triggers (issue 10): >= 10,000 generated bodies in total.

Every body goes through the real trigger function (``function_app`` -> ``get_user_function()``) with
fake ports. Properties, for ANY body: the answer is 202/400/413 (503 only while the queue is down,
200/400 for the validation handshake); nothing is enqueued for a refused body; every enqueued item
parses as a work item, names a known subscription, carries that subscription's mailbox/folder and is
backed by a notification with the right clientState and tenant. For well-formed collections an
independent oracle says exactly which items must be enqueued.
"""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.names import INBOUND_QUEUE, MAILBOX_SYNC_QUEUE
from core.work_items import InboundItem, MailboxSyncItem

from .webhook_support import (
    MAX_BODY,
    SUBS,
    TENANT,
    call_trigger,
    check_invariants,
    expected_inbound,
    expected_lifecycle,
)

pytestmark = pytest.mark.slow

LIFECYCLE_EVENTS = ("missed", "subscriptionRemoved", "reauthorizationRequired")


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example, HealthCheck.filter_too_much])


class Counter:
    """Counts the examples a hypothesis test really ran (so the '>= N payloads' claim is checked)."""

    def __init__(self) -> None:
        self.n = 0
        self.accepted = 0  # examples where the oracle expected at least one enqueue

    def __call__(self) -> None:
        self.n += 1


# ------------------------------------------------------------------------------------------ strategies

lone_surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
unicode_text = st.text(st.characters(), max_size=40) | st.text(st.characters(codec="utf-8"), max_size=40)
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | unicode_text)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=12), c, max_size=4), max_leaves=10)
huge_strings = st.builds(lambda ch, n: ch * n, st.sampled_from(["x", "é", "\U0001f600", "\ud800", "\x00", "\u2028",
                                                                 '"\\', "\ufeff"]),
                         st.integers(min_value=1025, max_value=12_000))
numbers_as_strings = st.integers().map(str) | st.floats(allow_nan=False).map(str)
weird_values = json_values | huge_strings | numbers_as_strings | lone_surrogates
message_ids = (st.text(string.ascii_letters + string.digits + "-_=+/", min_size=1, max_size=160)
               | unicode_text | lone_surrogates)


# Every strategy is built once, here, not inside the composites' draws: building one per draw made Hypothesis
# validate it again each time (most of these tests' time). The drawn examples are the same (derandomized runs).
_ONE_IN_TEN = st.integers(0, 9)
_ONE_IN_TWENTY = st.integers(0, 19)
_UP_TO_THREE = st.integers(0, 3)
_SUBS = st.sampled_from(SUBS)
_TENANTS = st.sampled_from([TENANT, TENANT.upper()])
_LIFECYCLE_EVENTS = st.sampled_from(LIFECYCLE_EVENTS)
_CHANGE_TYPES = st.sampled_from(["created", "updated", "deleted"])
_OPS = st.sampled_from(["drop", "retype", "secret", "unknown", "huge", "numstr", "tenant", "event", "rd", "extra"])
_BAD_TENANTS = st.sampled_from(["", TENANT + " ", "common", TENANT.replace("1", "2")]) | weird_values
_BAD_EVENTS = st.sampled_from(["Created", "created ", "missed\x00", "", "subscriptionremoved"]) | weird_values
_BAD_RESOURCE_DATA = st.sampled_from([None, [], "id", {"id": ""}, {"id": None}, {"ID": "x"}, {"id": "m" * 1025},
                                      {"id": 42}]) | json_values
_EXTRA_KEYS = st.text(max_size=20)


@functools.lru_cache(maxsize=1024)
def _keys_of(keys: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.sampled_from(keys)


@functools.cache
def _unknown_subscription_ids(sub_id: str) -> st.SearchStrategy[Any]:
    return st.sampled_from([sub_id.upper(), sub_id + " ", "", "s" * 1025,
                            "00000000-0000-0000-0000-000000000000"]) | weird_values


@functools.cache
def _wrong_client_states(secret: str) -> st.SearchStrategy[Any]:
    other = [s.client_state for s in SUBS if s.client_state != secret]
    return st.sampled_from([
        secret[:-1], secret + " ", " " + secret, secret.upper(), secret[::-1], "", secret + "\x00",
        secret.encode().hex(), other[0], other[-1], None, 0, [secret], {"value": secret},
    ]) | weird_values


def _wrong_client_state(draw: Callable[[Any], Any], secret: str) -> Any:
    return draw(_wrong_client_states(secret))


@st.composite
def notifications(draw: Callable[[Any], Any], *, lifecycle: bool = False) -> Any:
    if draw(_ONE_IN_TWENTY) == 0:
        return draw(weird_values)  # not even an object
    sub = draw(_SUBS)
    item: dict[str, Any] = {
        "subscriptionId": sub.id,
        "subscriptionExpirationDateTime": "2030-01-01T00:00:00.0000000Z",
        "clientState": sub.client_state,
        "tenantId": draw(_TENANTS),
    }
    if lifecycle:
        item["lifecycleEvent"] = draw(_LIFECYCLE_EVENTS)
    else:
        mid = draw(message_ids)
        item["changeType"] = draw(_CHANGE_TYPES)
        item["resource"] = f"Users/{sub.id}/Messages/{mid}"
        item["resourceData"] = {"@odata.type": "#Microsoft.Graph.Message", "@odata.id": f"Users/x/Messages/{mid}",
                                "@odata.etag": 'W/"CQAAABYAAAA"', "id": mid}
    for _ in range(draw(_UP_TO_THREE)):
        op = draw(_OPS)
        key = draw(_keys_of(tuple(sorted(item))))
        if op == "drop":
            item.pop(key, None)
        elif op == "retype":
            item[key] = draw(json_values)
        elif op == "secret":
            item["clientState"] = _wrong_client_state(draw, sub.client_state)
        elif op == "unknown":
            item["subscriptionId"] = draw(_unknown_subscription_ids(sub.id))
        elif op == "huge":
            item[key] = draw(huge_strings)
        elif op == "numstr":
            item[key] = draw(numbers_as_strings)
        elif op == "tenant":
            item["tenantId"] = draw(_BAD_TENANTS)
        elif op == "event":
            field = "lifecycleEvent" if lifecycle else "changeType"
            item[field] = draw(_BAD_EVENTS)
        elif op == "rd":
            item["resourceData"] = draw(_BAD_RESOURCE_DATA)
        else:
            item[draw(_EXTRA_KEYS)] = draw(weird_values)
    return item


_NOTIFICATIONS = notifications()
_LIFECYCLE_NOTIFICATIONS = notifications(lifecycle=True)


def _encode(data: Any, ensure_ascii: bool) -> bytes:
    # With ensure_ascii=False lone surrogates cannot be UTF-8: such a body must be refused as "not JSON".
    return json.dumps(data, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


def _decodable(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _assert_collection_outcome(name: str, items: list[Any], body: bytes, queue_down: bool,
                               runs: Counter | None = None) -> None:
    outcome = call_trigger(name, body, queue_down=queue_down)
    check_invariants(name, body, outcome, queue_down=queue_down)
    if len(body) > MAX_BODY:
        assert outcome.status == 413
        return
    if not _decodable(body) or len(items) > 1000:
        assert outcome.status == 400
        return
    # Judge what the JSON *means* (a surrogate pair written as two escapes is one character; for a repeated key
    # the last value counts), not the Python objects the body was generated from.
    items = json.loads(body)["value"]
    if name == "graph_notifications":
        want = expected_inbound(items)
        got = [(i.mailbox, i.message_id) for i in map(InboundItem.from_json, outcome.enqueued.get(INBOUND_QUEUE, []))]
    else:
        want = expected_lifecycle(items)
        got = [(i.mailbox, i.reason) for i in map(MailboxSyncItem.from_json,
                                                   outcome.enqueued.get(MAILBOX_SYNC_QUEUE, []))]
    if runs is not None and want:
        runs.accepted += 1
    if queue_down and want:
        assert outcome.status == 503 and got == []
    else:
        assert outcome.status == 202
        assert got == want


# ------------------------------------------------------------------------------------------ tests


def test_change_notification_collections() -> None:
    runs = Counter()

    @fuzz_settings(4000)
    @given(items=st.lists(_NOTIFICATIONS, max_size=12), ascii_only=st.booleans(),
           queue_down=st.integers(0, 9).map(lambda n: n == 0), extra=st.dictionaries(st.text(max_size=8),
                                                                                      json_values, max_size=2))
    def run(items: list[Any], ascii_only: bool, queue_down: bool, extra: dict[str, Any]) -> None:
        runs()
        body = _encode({**extra, "value": items}, ascii_only)
        _assert_collection_outcome("graph_notifications", items, body, queue_down, runs)

    run()
    assert runs.n >= 4000
    assert runs.accepted > runs.n // 10, "the generator must also produce authentic notifications"


def test_lifecycle_notification_collections() -> None:
    runs = Counter()

    @fuzz_settings(1500)
    @given(items=st.lists(_LIFECYCLE_NOTIFICATIONS, max_size=8), ascii_only=st.booleans(),
           queue_down=st.integers(0, 9).map(lambda n: n == 0))
    def run(items: list[Any], ascii_only: bool, queue_down: bool) -> None:
        runs()
        body = _encode({"value": items}, ascii_only)
        _assert_collection_outcome("graph_lifecycle", items, body, queue_down, runs)

    run()
    assert runs.n >= 1500
    assert runs.accepted > runs.n // 10, "the generator must also produce authentic notifications"


_DUPLICATE_KEY_ITEMS = st.lists(_NOTIFICATIONS, min_size=1, max_size=5)
_ONE_TO_THREE = st.integers(1, 3)
_DECOYS = st.sampled_from(["", None, 0, "forged", [1]]) | weird_values
_BOOLEANS = st.booleans()


@functools.cache
def _up_to(n: int) -> st.SearchStrategy[int]:
    return st.integers(0, n)


@st.composite
def duplicate_key_bodies(draw: Callable[[Any], Any]) -> tuple[bytes, list[Any]]:
    """Objects with repeated keys (e.g. a wrong clientState first, the right one last): JSON's last value wins."""
    effective: list[Any] = []
    texts: list[str] = []
    for item in draw(_DUPLICATE_KEY_ITEMS):
        if not isinstance(item, dict) or not item:
            effective.append(item)
            texts.append(json.dumps(item))
            continue
        pairs = list(item.items())
        for _ in range(draw(_ONE_TO_THREE)):
            key = draw(_keys_of(tuple(k for k, _ in pairs)))
            decoy = draw(_DECOYS)
            pairs.insert(draw(_up_to(len(pairs))), (key, decoy))
        effective.append(dict(pairs))
        texts.append("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}")
    body = '{"value":[' + ",".join(texts) + "]}"
    if draw(_BOOLEANS):
        body = '{"value":[],' + body[1:]  # a duplicated top-level "value" too: the last array counts
    return body.encode("utf-8"), effective


def test_duplicate_keys() -> None:
    runs = Counter()

    @fuzz_settings(1500)
    @given(case=duplicate_key_bodies(), queue_down=st.integers(0, 9).map(lambda n: n == 0))
    def run(case: tuple[bytes, list[Any]], queue_down: bool) -> None:
        runs()
        body, effective = case
        _assert_collection_outcome("graph_notifications", effective, body, queue_down, runs)

    run()
    assert runs.n >= 1500
    assert runs.accepted > runs.n // 10, "the generator must also produce authentic notifications"


def _valid_body() -> bytes:
    s = SUBS[0]
    return json.dumps({"value": [{"subscriptionId": s.id, "clientState": s.client_state, "tenantId": TENANT,
                                  "changeType": "created", "resourceData": {"id": "AAMkAD="}}]}).encode()


_HOSTILE_KINDS = st.sampled_from(["binary", "json_value", "nested", "nested_inside", "oversized", "truncated",
                                  "flipped", "constants", "many_items", "bom", "big_number"])
_BINARY_BODIES = st.binary(max_size=3000)
_NESTED_DEPTHS = st.integers(50, 30_000)
_NESTINGS = st.sampled_from([("[", "]"), ('{"value":', "}"), ('{"a":[', "]}")])
_INNER_DEPTHS = st.integers(50, 20_000)
_PADS = st.integers(1, 5000)
_FLIPS = st.integers(1, 4)
_BYTES = st.integers(0, 255)
_CONSTANT_BODIES = st.sampled_from([b'{"value":[NaN]}', b'{"value":[Infinity]}', b'{"value":-Infinity}',
                                    b'{"value":[1e999]}', b"null", b"", b"   ", b'{"value":null}',
                                    b'{"value":{}}', b'{"value":"[]"}', b"[]", b'"value"'])
_ITEM_COUNTS = st.sampled_from([999, 1000, 1001, 5000])
_BIG_NUMBER_DIGITS = st.integers(4000, 20_000)


@st.composite
def hostile_bodies(draw: Callable[[Any], Any]) -> bytes:
    kind = draw(_HOSTILE_KINDS)
    if kind == "binary":
        return draw(_BINARY_BODIES)
    if kind == "json_value":
        return json.dumps(draw(json_values)).encode("utf-8", "surrogatepass")
    if kind == "nested":
        depth = draw(_NESTED_DEPTHS)
        opener, closer = draw(_NESTINGS)
        return (opener * depth + closer * depth).encode()[:MAX_BODY]
    if kind == "nested_inside":
        depth = draw(_INNER_DEPTHS)
        s = SUBS[0]
        head = (f'{{"value":[{{"subscriptionId":"{s.id}","clientState":{json.dumps(s.client_state)},'
                f'"tenantId":"{TENANT}","changeType":"created","resourceData":')
        return (head + '{"id":' * depth + '"x"' + "}" * depth + "}]}").encode()
    if kind == "oversized":
        pad = draw(_PADS)
        base = _valid_body()
        return base[:-1] + b" " * (MAX_BODY - len(base) + pad) + b"}"
    if kind == "truncated":
        base = _valid_body()
        return base[: draw(_up_to(len(base) - 1))]
    if kind == "flipped":
        base = bytearray(_valid_body())
        for _ in range(draw(_FLIPS)):
            base[draw(_up_to(len(base) - 1))] = draw(_BYTES)
        return bytes(base)
    if kind == "constants":
        return draw(_CONSTANT_BODIES)
    if kind == "many_items":
        n = draw(_ITEM_COUNTS)
        return ('{"value":[' + ",".join(["{}"] * n) + "]}").encode()
    if kind == "bom":
        return b"\xef\xbb\xbf" + _valid_body()
    return ('{"value":[{"subscriptionId":' + "9" * draw(_BIG_NUMBER_DIGITS) + "}]}").encode()


def test_hostile_bodies() -> None:
    runs = Counter()

    @fuzz_settings(3000)
    @given(body=hostile_bodies(), name=st.sampled_from(["graph_notifications", "graph_lifecycle"]),
           queue_down=st.integers(0, 9).map(lambda n: n == 0))
    def run(body: bytes, name: str, queue_down: bool) -> None:
        runs()
        outcome = call_trigger(name, body, queue_down=queue_down)
        check_invariants(name, body, outcome, queue_down=queue_down)

    run()
    assert runs.n >= 3000


def test_validation_handshake() -> None:
    runs = Counter()
    # Query values reach the function already percent-decoded with errors="replace": no lone surrogates.
    tokens = st.text(st.characters(exclude_categories=["Cs"]), max_size=64) | st.builds(
        lambda n: "t" * n, st.integers(4000, 5000))

    @fuzz_settings(500)
    @given(token=tokens, body=st.binary(max_size=200), name=st.sampled_from(["graph_notifications",
                                                                             "graph_lifecycle"]))
    def run(token: str, body: bytes, name: str) -> None:
        runs()
        outcome = call_trigger(name, body, params={"validationToken": token})
        check_invariants(name, body, outcome, queue_down=False, handshake=token)
        assert outcome.status == (200 if 0 < len(token) <= 4096 else 400)

    run()
    assert runs.n >= 500


# ------------------------------------------------------------------------------------------ hand-made cases


@pytest.mark.parametrize("queue_down", [False, True])
def test_the_one_valid_item_in_a_hostile_collection_is_the_only_one_enqueued(queue_down: bool) -> None:
    a, b, _ = SUBS
    items = [
        {"subscriptionId": a.id, "clientState": a.client_state[:-1] + "X", "tenantId": TENANT,
         "changeType": "created", "resourceData": {"id": "forged-near-miss"}},
        {"subscriptionId": a.id, "clientState": b.client_state, "tenantId": TENANT,
         "changeType": "created", "resourceData": {"id": "forged-other-secret"}},
        {"subscriptionId": "not-ours", "clientState": a.client_state, "tenantId": TENANT,
         "changeType": "created", "resourceData": {"id": "forged-unknown-sub"}},
        {"subscriptionId": a.id, "clientState": a.client_state, "tenantId": "evil-tenant",
         "changeType": "created", "resourceData": {"id": "forged-tenant"}},
        {"subscriptionId": b.id, "clientState": b.client_state, "tenantId": TENANT.upper(),
         "changeType": "updated", "resourceData": {"id": "REAL"}},
        {"subscriptionId": b.id, "clientState": b.client_state, "tenantId": TENANT,
         "changeType": "created", "resourceData": {"id": "REAL"}},
    ]
    body = json.dumps({"value": items}).encode()
    outcome = call_trigger("graph_notifications", body, queue_down=queue_down)
    check_invariants("graph_notifications", body, outcome, queue_down=queue_down)
    if queue_down:
        assert outcome.status == 503 and outcome.enqueued == {}
    else:
        assert outcome.status == 202
        enqueued = [InboundItem.from_json(m) for m in outcome.enqueued[INBOUND_QUEUE]]
        assert [(i.mailbox, i.message_id, i.folder) for i in enqueued] == [(b.mailbox, "REAL", b.folder)]


def test_body_just_over_the_default_limit_is_413() -> None:
    base = _valid_body()
    body = base[:-1] + b" " * (1_048_577 - len(base)) + b"}"
    assert len(body) == 1_048_577
    outcome = call_trigger("graph_notifications", body, max_body=1_048_576)
    assert outcome.status == 413 and outcome.enqueued == {}
    exact = base[:-1] + b" " * (1_048_576 - len(base)) + b"}"
    assert call_trigger("graph_notifications", exact, max_body=1_048_576).status == 202
