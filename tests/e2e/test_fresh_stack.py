"""A fresh ``make run`` as a new user meets it (issue 16): the launcher (``python -m local.stack up``, every service,
the demo org, on free ports) syncs CRM and reconciles once at start; ``emailrouter status`` never reports a healthy
mailbox as failing, and shows 0 failing and 0 pending within a minute. Then the start-up race of the issue, on
purpose: the reconcile timer (through the host's admin API) and two admins' ``emailrouter subscriptions reconcile``
at the same moment leave exactly one Graph subscription per watched mailbox folder."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from emulators.common.server import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PORTS = ("functions", "blob", "queue", "table", "identity", "graph", "smtp", "dataverse")
CLI = [sys.executable, "-c", "import sys; from core.cli import main; sys.exit(main(sys.argv[1:]))"]


def _env() -> dict[str, str]:
    """The CLI's environment: the running stack's .local/stack.json in the working directory decides."""
    return {k: v for k, v in os.environ.items() if k not in ("AzureWebJobsStorage", "TABLE_PREFIX")}


def _cli(workdir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *argv], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300,
                          check=False)


def _json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


async def _graph_subscriptions(state: dict[str, Any], *, wipe: bool = False) -> list[dict[str, Any]]:
    """Graph's own list (not our table): with ``wipe``, every subscription and record is deleted first."""
    from core.bootstrap import Container
    from core.cli.config import stack_values
    from core.config import Settings

    values = stack_values(state)
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if values.get(name):
            os.environ[name] = values[name]
    container = Container(Settings(values))
    try:
        if wipe:
            for sub in await container.graph.list_subscriptions():
                await container.graph.delete_subscription(str(sub["id"]))
            async for record in container.subscription_directory.list():
                await container.subscription_directory.delete(record.id)
        return await container.graph.list_subscriptions()
    finally:
        await container.graph.close()
        await container.storage.close()


@pytest.mark.timeout(600)
def test_fresh_stack_is_healthy_and_concurrent_reconciles_make_one_subscription_per_folder(tmp_path: Path) -> None:
    workdir = tmp_path
    log_path = tmp_path / "stack.log"
    ports = [arg for name in PORTS for arg in (f"--{name}-port", str(free_port()))]
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "local.stack", "up", "--state-dir", str(workdir / ".local"), "--fresh", *ports],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"},
            start_new_session=True)
    try:
        deadline = time.monotonic() + 360
        while "stack is up" not in log_path.read_text(errors="replace"):
            assert launcher.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-4000:]
            time.sleep(0.5)
        output = log_path.read_text(errors="replace")
        assert "first round: emailrouter sync-crm: ok" in output
        assert "first round: emailrouter subscriptions reconcile: ok" in output
        state = json.loads((workdir / ".local" / "stack.json").read_text())

        # status right after start: never "failing" for a healthy org; settled (no pending) within a minute.
        settled_by = time.monotonic() + 60
        while True:
            mailboxes = _json(_cli(workdir, "--json", "status"))["mailboxes"]
            assert mailboxes["failing"] == [], mailboxes
            if not mailboxes["pending"] or time.monotonic() > settled_by:
                break
            time.sleep(2)
        assert mailboxes["pending"] == [] and mailboxes["by_health"].get("ok", 0) >= 7, mailboxes
        watched = {(s["mailbox"], s["folder"]) for s in _json(_cli(workdir, "--json", "subscriptions", "list"))}
        assert len(watched) >= 7

        # The race: the timer and two admins reconcile at once, from nothing. Each subscription create takes
        # a second (Graph emulator latency) and the admins create one at a time, so the runs overlap for seconds:
        # without the reconcile lease every run creates every subscription (tests/integration shows that too).
        asyncio.run(_graph_subscriptions(state, wipe=True))
        graph_admin = state["graph"]["url"].rstrip("/") + "/_emulator/faults"
        verify = state["ca_bundle"]
        slow = httpx.post(graph_admin, json={"method": "POST", "path": "/subscriptions$", "status": 0,
                                             "latency_ms": 1000}, verify=verify, timeout=30)
        assert slow.status_code == 201, slow.text
        admin_url = state["functions"]["base_url"].rsplit("/api", 1)[0] + "/admin/functions/subscription_reconcile"
        admins = [subprocess.Popen([*CLI, "--json", "subscriptions", "reconcile"], cwd=workdir,
                                   env={**_env(), "SUBSCRIPTION_CREATE_CONCURRENCY": "1"},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        time.sleep(2.5)  # the admins' processes are up and reconciling
        timer = httpx.post(admin_url, json={"input": ""}, headers={"x-functions-key": state["functions"]["admin_key"]},
                           timeout=30)
        assert timer.status_code == 202
        results = [p.communicate(timeout=300) for p in admins]
        httpx.delete(f"{graph_admin}/{slow.json()['id']}", verify=verify, timeout=30)
        waited = [err for _, err in results if "another subscription reconcile is running" in err]
        assert waited, results  # one admin found the other's reconcile running and waited for it
        assert all(p.returncode == 0 for p in admins), results
        created = sum(json.loads(out)["created"] for out, _ in results)
        assert created <= len(watched)  # the timer made the rest; nobody made one twice

        def settled() -> list[dict[str, Any]] | None:
            subs = asyncio.run(_graph_subscriptions(state))
            return subs if len(subs) >= len(watched) else None

        poll_until = time.monotonic() + 120
        subs = settled()
        while subs is None and time.monotonic() < poll_until:
            time.sleep(1)
            subs = settled()
        assert subs is not None
        time.sleep(3)  # a straggler would show now
        per_resource = Counter(str(s["resource"]).lower() for s in asyncio.run(_graph_subscriptions(state)))
        assert len(per_resource) == len(watched) and max(per_resource.values()) == 1, per_resource
        listed = _json(_cli(workdir, "--json", "subscriptions", "list"))
        assert sorted((s["mailbox"], s["folder"]) for s in listed) == sorted(watched)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGINT)
            try:
                launcher.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait(10)
