"""The demo org and the ``make demo`` scenario (issue 9).

The fast tests check that ``local.demo_org`` is one consistent org across the three emulators. The slow one runs
the whole scripted scenario on a fresh stack, exactly as ``make demo`` does, and also renders the live view of
that stack once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from emulators.common import demo
from emulators.identity.seed import parse_seed
from local import demo_org
from local.demo import run_demo
from local.live_view import Snapshot, StackReader, collect, render


def test_identity_seed_is_valid_and_grants_graph_roles() -> None:
    seed = parse_seed(demo_org.identity_seed())
    app = seed.app(demo.TENANT_ID, demo.APP_CLIENT_ID)
    assert app is not None and demo.APP_CLIENT_SECRET in app.secrets
    assert {"Mail.ReadWrite", "Mail.Send"} <= app.roles_for(demo.GRAPH_RESOURCE)


def test_one_identity_per_person_across_graph_and_dataverse() -> None:
    graph_users = {u["mail"]: u for u in demo_org.graph_seed()["users"]}
    crm_users = {u["internalemailaddress"]: u for u in demo_org.dataverse_seed()["systemusers"]
                 if not u.get("applicationid")}
    assert set(crm_users) == {p.address for p in demo_org.PEOPLE}
    for address, user in crm_users.items():
        assert graph_users[address]["id"] == user["azureactivedirectoryobjectid"] == demo_org.entra_object_id(address)
        assert graph_users[address]["userPrincipalName"] == user["domainname"]
    # one person's UPN differs from her mail address (the router must reach her by object id)
    assert any(u["userPrincipalName"] != u["mail"] for u in graph_users.values())
    # the queue and the sink are mailboxes in Exchange too
    assert demo_org.QUEUE.address in graph_users and demo_org.SINK.address in graph_users
    assert len({u["id"] for u in graph_users.values()}) == len(graph_users)


def test_org_covers_every_method_and_filter() -> None:
    seed = demo_org.dataverse_seed()
    people = [u for u in seed["systemusers"] if not u.get("applicationid")]
    assert {u["incomingemaildeliverymethod"] for u in people} == {0, 1, 2, 3}
    assert {u["usersettings"]["incomingemailfilteringmethod"] for u in people} == {0, 1, 2, 3, 4}
    assert any(u["outgoingemaildeliverymethod"] == 2 and u["incomingemaildeliverymethod"] == 2 for u in people)
    assert seed["opportunities"] and seed["incidents"] and seed["leads"] and seed["accounts"] and seed["contacts"]
    queue = seed["queues"][0]
    assert queue["emailaddress"] == demo_org.QUEUE.address and queue["incomingemaildeliverymethod"] == 2


def test_forward_user_has_the_rule_and_the_sink_is_a_crm_forward_mailbox() -> None:
    bob = next(u for u in demo_org.graph_seed()["users"] if u["userPrincipalName"] == demo_org.person("bob").address)
    (rule,) = bob["rules"]
    targets = [r["emailAddress"]["address"] for r in rule["actions"]["forwardAsAttachmentTo"]]
    assert targets == [demo_org.SINK.address] and rule["conditions"] == {}
    (entity_set, rid, payload), = demo_org.crm_runtime_records()
    # no regarding user/queue: Dataverse makes it a forward mailbox (isforwardmailbox is read-only, default Yes)
    assert entity_set == "mailboxes" and "isforwardmailbox" not in payload and "regardingobjectid" not in payload
    assert payload["emailaddress"] == demo_org.SINK.address and str(uuid.UUID(rid)) == rid


def test_seed_files_are_deterministic(tmp_path: Path) -> None:
    first = {k: v.read_bytes() for k, v in demo_org.write_seed_files(tmp_path / "a").items()}
    second = {k: v.read_bytes() for k, v in demo_org.write_seed_files(tmp_path / "b").items()}
    assert first == second and set(first) == {"identity", "graph", "dataverse"}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_demo_scenario_passes_on_a_fresh_stack(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def inspect(stack: Mapping[str, Any]) -> None:
        async def snap() -> Snapshot:
            reader = StackReader(stack)
            try:
                return await collect(reader)
            finally:
                await reader.close()

        seen["snapshot"] = asyncio.run(snap())
        render(seen["snapshot"])  # renders without error

    result = run_demo(timeout=200, log_dir=tmp_path / "logs", inspect=inspect)
    failed = [f"{s.title}: expected {s.expected}; observed {s.outcome.observed}"
              for s in result.scenarios if not s.outcome.passed]
    assert not result.error, f"{result.error} (logs in {result.log_dir})"
    assert not failed, "\n".join(failed)
    snapshot: Snapshot = seen["snapshot"]
    assert snapshot.watched_mailboxes == 7
    tracked_mailboxes = {row.mailbox for row in snapshot.tracked}
    assert demo_org.person("erin").address in tracked_mailboxes
    assert snapshot.totals["tracked"] >= 7 and snapshot.totals["skipped"] >= 4
    assert snapshot.totals["sent"] >= 2
