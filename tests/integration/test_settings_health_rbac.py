"""Exchange RBAC for Applications (audit graph-fidelity #5): the app's token carries no Mail.* roles, the grants
live in Exchange on a management scope. The router still syncs, resolves mailbox ids and probes health; a mailbox
in the scope is healthy (Mail.Send "not proven" is not a failure), one outside it fails with access denied."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from core.bootstrap import Container
from core.config import Settings
from core.names import MAILBOXES_TABLE, ORG_SETTINGS_TABLE
from core.settings.crm_sync import CrmSyncService
from core.settings.health import health_service_for
from emulators.common import demo
from emulators.identity.testing import demo_seed
from local.azurite import Azurite
from tests.unit.settings.localstack import DOMAIN, LocalStack, start_local_stack

pytestmark = pytest.mark.integration

RBAC_APP = "c0ffee00-0000-4000-8000-0000000000a7"
SECRET = "rbac-app-secret-for-the-emulator-only"
ALICE, SUPPORT = f"alice@{DOMAIN}", f"support@{DOMAIN}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, azurite: Azurite) -> Iterator[LocalStack]:
    for s in start_local_stack(tmp_path_factory.mktemp("tls"), azurite):
        seed = demo_seed()
        seed["apps"].append({**seed["apps"][0], "client_id": RBAC_APP, "object_id": RBAC_APP.replace("a7", "a8"),
                             "display_name": "router with RBAC for Applications", "secrets": [SECRET],
                             "certificates": [], "roles": {demo.GRAPH_RESOURCE: ["User.Read.All"]}})
        httpx.post(f"{s.identity.url}/_emulator/seed", json=seed, verify=s.ssl(), timeout=30).raise_for_status()
        roles = ("Mail.Read", "Mail.ReadWrite", "Mail.Send")
        s.graph_emulator("POST", "role-assignments", {"app_id": RBAC_APP, "assignments": [
            {"role": f"Application {role}", "scope": [ALICE]} for role in roles]})
        yield s


@pytest.fixture
async def container(stack: LocalStack) -> AsyncIterator[Container]:
    # Graph as the RBAC-scoped app; Dataverse as the demo application user.
    c = Container(Settings({**stack.fresh_values(), "GRAPH_CLIENT_ID": RBAC_APP, "GRAPH_CLIENT_SECRET": SECRET,
                            "DATAVERSE_CLIENT_ID": demo.APP_CLIENT_ID,
                            "DATAVERSE_CLIENT_SECRET": demo.APP_CLIENT_SECRET}))
    try:
        yield c
    finally:
        await c.graph.close()
        await c.dataverse.close()
        await c.storage.close()


async def test_health_under_rbac_for_applications(container: Container) -> None:
    storage = container.storage
    report = await CrmSyncService(container.dataverse, storage.table(MAILBOXES_TABLE),
                                  storage.table(ORG_SETTINGS_TABLE), users=container.graph).run()
    assert not [e for e in report.errors if "directory lookup failed" in e], report.errors  # User.Read.All
    alice_row = await container.mailbox_directory.get_mailbox(ALICE)
    assert alice_row is not None and alice_row.graph_user_id  # resolved to the object id

    health = health_service_for(container)
    alice = {c.name: c for c in (await health.probe(ALICE)).checks}
    assert alice["graph_read"].ok, alice["graph_read"]
    assert alice["graph_send"].ok, alice["graph_send"]  # no Mail.Send in the token: unknown, not failing
    assert "not proven" in alice["graph_send"].detail

    support = {c.name: c for c in (await health.probe(SUPPORT)).checks}  # outside the management scope
    assert not support["graph_read"].ok and support["graph_read"].code == 403
    assert not support["graph_send"].ok and "access denied" in support["graph_send"].detail
