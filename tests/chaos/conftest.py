"""Chaos suite fixtures: the ``--chaos-full`` option (issue sizes: 2,000 inbound mails, 500 outbound emails) and one
whole stack per session (tests/e2e/stack_harness.py) with time-compressing app settings.

``--chaos-full`` is registered here; pytest only reads ``pytest_addoption`` from conftests it loads before parsing
the command line (the rootdir's and the ones named on it), so ``pytest tests/chaos --chaos-full`` works as is, and
``pytest -m chaos --chaos-full`` from the repository root needs the root ``tests/conftest.py`` to call
``add_chaos_options`` too (the guard below makes the double registration harmless). ``CHAOS_FULL=1`` in the
environment selects the full sizes as well.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.stack_harness import Org, Stack, build_org, poll, running_stack


def add_chaos_options(parser: pytest.Parser) -> None:
    try:
        parser.addoption("--chaos-full", action="store_true", default=False,
                         help="chaos suite at the issue's full sizes (2,000 inbound mails, 500 outbound emails)")
    except ValueError:  # already registered by the root conftest
        pass


def pytest_addoption(parser: pytest.Parser) -> None:
    add_chaos_options(parser)


@dataclass(frozen=True)
class ChaosSizes:
    full: bool
    mailboxes: int
    inbound_mails: int
    outbound_emails: int


@pytest.fixture(scope="session")
def chaos_sizes(request: pytest.FixtureRequest) -> ChaosSizes:
    full = bool(request.config.getoption("--chaos-full", default=False)) or os.environ.get("CHAOS_FULL") == "1"
    if full:
        return ChaosSizes(True, mailboxes=40, inbound_mails=2000, outbound_emails=500)
    return ChaosSizes(False, mailboxes=24, inbound_mails=300, outbound_emails=100)


# Time compression, through app settings of the generated local.settings.json (docs/outbound.md, docs/inbound.md):
# scans, retries, leases and catch-up in seconds instead of minutes. The product's logic is unchanged.
HOST_VALUES = {
    "OUTBOUND_SCAN_SCHEDULE": "*/5 * * * * *",
    "DELTA_CATCHUP_SCHEDULE": "*/30 * * * * *",
    "OUTBOUND_RETRY_BASE_SECONDS": "2",
    "OUTBOUND_RETRY_MAX_SECONDS": "15",
    "OUTBOUND_LEASE_SECONDS": "30",
    "OUTBOUND_REQUEUE_AFTER_SECONDS": "30",
    "OUTBOUND_SEND_SETTLE_SECONDS": "5",
    "INBOUND_MAX_RETRY_DELAY_SECONDS": "30",
}
# The local host keeps a running queue message invisible for 600 s (as the real host); after the SIGKILL that
# would stall the run for ten minutes, so the harness shortens that lease for the host it starts.
HOST_LEASE_SECONDS = 45


def first_delta_round(stack: Stack, org: Org, *, within: float = 180.0) -> None:
    """Every watched mailbox gets its delta token before the suites start (the delta catch-up timer, run now through
    the admin API, as the deployment runbook does). The inbound suite's eviction faults hit the *use* of a token,
    and a first round has none: without this, a run that converges before the timer's second round would see no
    eviction to survive."""
    watched = len(org.watched)
    stack.run_function("delta_catchup")

    def tokens() -> bool:
        return len(stack.table_rows("DeltaState")) >= watched and stack.queue_depth("mailbox-sync") == 0

    poll("a delta token for every watched mailbox", tokens, within=within, every=0.5)


@dataclass
class ChaosEnv:
    stack: Stack
    org: Org
    sizes: ChaosSizes


@pytest.fixture(scope="session")
def chaos_env(tmp_path_factory: pytest.TempPathFactory, chaos_sizes: ChaosSizes) -> Iterator[ChaosEnv]:
    workdir = Path(tmp_path_factory.mktemp("chaos-stack"))
    with running_stack(workdir, extra_values=HOST_VALUES, lease_seconds=HOST_LEASE_SECONDS) as stack:
        org = build_org(chaos_sizes.mailboxes)
        stack.seed_org(org)
        # Admin edits of the OrgSettings table (docs/admin-guide.md), before the host reads them: a stuck send
        # claim is taken back after the shortest allowed timeout, and transient faults get more attempts.
        stack.set_org_setting("OutboundReaperTimeoutSeconds", "60")
        stack.set_org_setting("OutboundMaxAttempts", "10")
        stack.start_host()
        stack.sync_and_subscribe(org)
        first_delta_round(stack, org)
        try:
            yield ChaosEnv(stack, org, chaos_sizes)
        finally:
            print(f"\nchaos stack logs kept in {workdir} (functions.log and one per service)")
