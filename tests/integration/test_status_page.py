"""``/api/status`` through the local Functions host and Azurite, read in a real headless Chromium (Debian's
``chromium`` + ``chromium-driver``, installed by ``make install``) with JavaScript switched off.

The state is written through the router's own adapters (settings directory, decision log, outbound ledger, poison
queue), the page is loaded with and without the function key, a screenshot is saved (``tmp_path`` and
``.local/test-artifacts/status-page.png``, not committed), and the assertions read the rendered page.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from core.bootstrap import Container
from core.config import Settings
from core.names import INBOUND_QUEUE
from local.azurite import Azurite
from local.stack import Stack

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / ".local" / "test-artifacts"
DOMAIN = "contoso.example"
ALICE, BOB, ERIN = f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"erin@{DOMAIN}"
HOSTILE_ERROR = "graph_read: cannot read the Inbox [403 ErrorAccessDenied] <script>document.title='pwned'</script>"
OUTBOUND_REASON = "Graph 403 ErrorAccessDenied: the mailbox is outside the app's access policy"


def _browser_available() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


if not _browser_available() and os.environ.get("CI"):
    pytest.fail(f"{CHROMIUM} / {CHROMEDRIVER} missing on CI: `make install` installs Debian's chromium and "
                "chromium-driver", pytrace=False)
needs_browser = pytest.mark.skipif(not _browser_available(),
                                   reason="Debian's chromium + chromium-driver not installed (make install does)")


async def _seed(values: dict[str, str]) -> None:
    from core.adapters.inbound_state import InboundState
    from core.adapters.outbound_state import TableOutboundLedger
    from core.names import MAILBOX_STATUS_TABLE
    from core.services.outbound import LedgerEntry, Phase

    container = Container(Settings(values))
    try:
        directory = container.mailbox_directory
        for address in (ALICE, BOB, ERIN):
            await directory.set_overrides(address, {"Kind": "user", "OwnerId": str(uuid.uuid4()),
                                                    "Inbound": "individual", "Outbound": "router"})
        status = container.storage.table(MAILBOX_STATUS_TABLE)
        await status.upsert({"PartitionKey": "mailbox", "RowKey": ALICE, "Health": "ok",
                             "LastProbeOn": "2024-05-01T10:00:00Z", "LastError": ""}, mode="merge")
        await status.upsert({"PartitionKey": "mailbox", "RowKey": ERIN, "Health": "failing",
                             "LastProbeOn": "2024-05-01T10:00:00Z", "LastError": HOSTILE_ERROR}, mode="merge")
        state = InboundState.for_container(container)
        decisions = [("tracked", ALICE)] * 3 + [("skipped:filter:not_accepted", ALICE)] * 2 + [
            ("skipped:skip_rule:auto_reply", BOB), ("failed:crm_rejected", BOB)]
        for n, (outcome, mailbox) in enumerate(decisions):
            await state.decisions.record(mailbox, f"graph-{n}-{uuid.uuid4().hex}", {
                "internetMessageId": f"<m{n}@fabrikam.example>", "mailbox": mailbox, "outcome": outcome,
                "from": "fiona@fabrikam.example", "subject": f"Message {n}",
                "decisions": [{"step": "filter", "outcome": outcome, "why": f"reason text {outcome}"}]})
        sender = container.storage.queue_sender(INBOUND_QUEUE + "-poison")
        await sender.send('{"kind":"inbound","poisoned":true}')
        await sender.close()
        await TableOutboundLedger(container.storage).put(LedgerEntry(
            str(uuid.uuid4()), ALICE, Phase.FAILED, attempts=5, last_error=OUTBOUND_REASON,
            updated_at=datetime.now(UTC)), etag=None)
    finally:
        await container.storage.close()


@pytest.fixture(scope="module")
def host(azurite: Azurite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The local Functions host alone (the stack driver with only ``functions``), over the session's Azurite; its
    timers never fire (no schedules), as nothing here is for them."""
    values = {"AzureWebJobsStorage": azurite.connection_string, "TABLE_PREFIX": "st" + uuid.uuid4().hex[:10]}
    asyncio.run(_seed(values))
    with Stack(Path(tmp_path_factory.mktemp("statushost")), services=["functions"], host_values=values,
               host_grace=5, timers=False) as h:
        yield h


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1800", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # JavaScript off: the page must work without it.
    options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log")),
                              options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    assert driver.save_screenshot(str(shot)), "screenshot failed"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / name)
    return shot


@needs_browser
def test_status_page_in_chromium(host: Stack, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    url = f"{host.functions_root}/api/status"
    # Without the key: 401 and no data, in the browser too.
    assert requests.get(url, timeout=30).status_code == 401
    browser.get(url)
    assert ERIN not in browser.page_source and "Email Router status" not in browser.page_source

    response = requests.get(url, params={"code": host.function_key}, timeout=60)
    assert response.status_code == 200, host.log_tail("functions")
    assert response.headers["Content-Type"].startswith("text/html")
    assert "script-src" not in response.headers["Content-Security-Policy"]  # default-src 'none': no script at all
    assert response.headers["Cache-Control"] == "no-store"

    browser.get(f"{url}?code={host.function_key}")
    shot = _screenshot(browser, tmp_path, "status-page.png")
    assert shot.stat().st_size > 10_000

    def text(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    assert browser.title == "Email Router status"  # the hostile error text did not run
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert text("count-tracked").startswith("3") and text("count-skipped").startswith("3")
    assert text("count-failed").startswith("1")
    assert text("mailboxes-total").startswith("3") and text("mailboxes-failing").startswith("1")

    rows = {r.find_elements(By.TAG_NAME, "td")[0].text: r
            for r in browser.find_elements(By.CSS_SELECTOR, "#mailboxes tbody tr")}
    assert set(rows) == {ALICE, BOB, ERIN}
    erin = [td.text for td in rows[ERIN].find_elements(By.TAG_NAME, "td")]
    assert erin[4] == "failing" and erin[6] == HOSTILE_ERROR  # shown as text, escaped
    first = browser.find_element(By.CSS_SELECTOR, "#mailboxes tbody tr td").text
    assert first == ERIN  # failing mailboxes first

    reasons = {r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text
               for r in browser.find_elements(By.CSS_SELECTOR, "#skip-reasons tbody tr")}
    assert reasons == {"not_accepted": "2", "auto_reply": "1"}

    queues = {r.find_elements(By.TAG_NAME, "td")[0].text: [td.text for td in r.find_elements(By.TAG_NAME, "td")]
              for r in browser.find_elements(By.CSS_SELECTOR, "#queues tbody tr")}
    assert queues["inbound-mail"][2] == "1"  # one poisoned message

    assert OUTBOUND_REASON in text("outbound-failures") and ALICE in text("outbound-failures")
