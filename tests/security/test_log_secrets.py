"""Logs carry no secrets (issue 10): no client secret, no bearer token / JWT, no function key, no clientState and
no message body text in any record at INFO or above, while the root logger captures everything at DEBUG.

Paths run: the HTTP triggers (health, both webhooks incl. rejections, the validation handshake and a queue
outage) and the pure inbound path (normalise -> unwrap -> plan) for tracked and skipped messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import azure.functions as func
import pytest

from core.bootstrap import set_container
from core.config import reset_settings_cache
from core.domain.model import FolderKind
from core.domain.normalize import normalize_graph_message, normalize_mime_message
from emulators.common import demo
from tests.fuzz.message_support import assert_pure_path
from tests.fuzz.webhook_support import SUBS, TENANT, FuzzContainer, indexed_functions

FUNCTION_KEY = "fk-" + "Zq9" * 12
JWT = ("eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJhdWQiOiJodHRwczovL2dyYXBoLm1pY3Jvc29mdC5jb20iLCJ0aWQiOiJ4In0."
       "c2lnbmF0dXJlLW5vdC1yZWFs")
BODY_MARKER = "BODY-TEXT-7f3a-do-not-log"
FORBIDDEN = {"client secret": demo.APP_CLIENT_SECRET, "function key": FUNCTION_KEY, "bearer": "Bearer ",
             "jwt": "eyJ", "message body": BODY_MARKER, **{f"clientState {s.id}": s.client_state for s in SUBS}}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def capture(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Capture]:
    monkeypatch.setenv("GRAPH_CLIENT_SECRET", demo.APP_CLIENT_SECRET)
    monkeypatch.setenv("DATAVERSE_CLIENT_SECRET", demo.APP_CLIENT_SECRET)
    monkeypatch.setenv("WEBHOOK_FUNCTION_KEY", FUNCTION_KEY)
    monkeypatch.setenv("GRAPH_TENANT_ID", TENANT)
    monkeypatch.setenv("GRAPH_CLIENT_ID", demo.APP_CLIENT_ID)
    reset_settings_cache()
    root = logging.getLogger()
    handler = _Capture()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    router = logging.getLogger("emailrouter")
    old_propagate, router.propagate = router.propagate, True  # the fuzz conftest silences it: not here
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        router.propagate = old_propagate


def _assert_clean(handler: _Capture) -> int:
    checked = 0
    for record in handler.records:
        if record.levelno < logging.INFO:
            continue
        text = handler.format(record)  # includes the traceback when there is one
        for what, secret in FORBIDDEN.items():
            assert secret not in text, f"{what} in a {record.levelname} record of {record.name}: {text[:200]}"
        checked += 1
    return checked


def _call(name: str, body: bytes, *, params: dict[str, str] | None = None, queue_down: bool = False) -> int:
    container = FuzzContainer(queue_down=queue_down)
    set_container(container)
    try:
        req = func.HttpRequest("POST", f"http://127.0.0.1/api/x?code={FUNCTION_KEY}",
                               headers={"authorization": f"Bearer {JWT}", "x-functions-key": FUNCTION_KEY},
                               params={"code": FUNCTION_KEY, **(params or {})}, body=body)
        fn = indexed_functions()[name].get_user_function()
        result = fn(req)
        resp = asyncio.run(result) if asyncio.iscoroutine(result) else result
        return int(resp.status_code)
    finally:
        set_container(None)


def test_webhook_paths_log_no_secrets(capture: _Capture) -> None:
    good, other, _ = SUBS
    items = [
        {"subscriptionId": good.id, "clientState": good.client_state, "tenantId": TENANT, "changeType": "created",
         "resourceData": {"id": "AAMk-1"}},
        {"subscriptionId": good.id, "clientState": f"Bearer {JWT}", "tenantId": TENANT, "changeType": "created",
         "resourceData": {"id": "AAMk-2"}},
        {"subscriptionId": good.id, "clientState": other.client_state, "tenantId": TENANT, "changeType": "created",
         "resourceData": {"id": "AAMk-3"}},
        {"subscriptionId": good.id, "clientState": good.client_state, "tenantId": demo.APP_CLIENT_SECRET,
         "changeType": "created", "resourceData": {"id": BODY_MARKER}},
        {"subscriptionId": other.id, "clientState": other.client_state, "tenantId": TENANT, "changeType": "bogus",
         "resourceData": {"id": "x"}},
    ]
    body = json.dumps({"value": items}).encode()
    assert _call("graph_notifications", body) == 202
    assert _call("graph_notifications", body, queue_down=True) == 503
    assert _call("graph_notifications", f'{{"value": [{{"clientState": "{JWT}"'.encode()) == 400
    assert _call("graph_notifications", b" " * (70 * 1024) + JWT.encode()) == 413
    assert _call("graph_notifications", b"", params={"validationToken": f"Bearer {JWT}"}) == 200
    lifecycle = [{**items[0], "lifecycleEvent": "missed"}, {**items[1], "lifecycleEvent": "reauthorizationRequired"}]
    assert _call("graph_lifecycle", json.dumps({"value": lifecycle}).encode()) == 202
    assert _call("health", b"") == 200
    assert _assert_clean(capture) >= 5, "the run must produce INFO+ records to check"


def test_normalise_and_plan_paths_log_no_secrets(capture: _Capture) -> None:
    secret_headers = [{"name": "Authorization", "value": f"Bearer {JWT}"},
                      {"name": "X-MS-Exchange-Organization-AuthAs", "value": "Internal"},
                      {"name": "X-Secret", "value": demo.APP_CLIENT_SECRET}]
    graph = {"id": "AAMk-1", "subject": "Order", "internetMessageId": "<o@fabrikam.example>",
             "from": {"emailAddress": {"address": "carol@fabrikam.example"}},
             "toRecipients": [{"emailAddress": {"address": "alice@contoso.example"}}],
             "internetMessageHeaders": secret_headers, "conversationIndex": "!!not base64",
             "body": {"contentType": "html", "content": f"<p>{BODY_MARKER}</p><script>{JWT}</script>"},
             "attachments": [{"@odata.type": "#microsoft.graph.fileAttachment", "name": "a.txt",
                              "contentBytes": "bad base64 " + BODY_MARKER}]}
    message = normalize_graph_message("alice@contoso.example", graph, FolderKind.INBOX)
    assert_pure_path(message)
    raw = (f"From: carol@fabrikam.example\r\nTo: alice@contoso.example\r\nSubject: s\r\n"
           f"Authorization: Bearer {JWT}\r\nMessage-ID: <m@fabrikam.example>\r\n\r\n{BODY_MARKER}\r\n").encode()
    assert_pure_path(normalize_mime_message("alice@contoso.example", raw))
    # The pure path has no business logging at INFO+ at all; whatever it logs must be clean.
    _assert_clean(capture)
    assert all(r.levelno < logging.WARNING for r in capture.records if r.name.startswith("emailrouter.domain"))
