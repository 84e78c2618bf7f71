"""CRM -> settings sync against the Dataverse emulator and Azurite: methods of several kinds, overrides surviving,
removed mailboxes disabled (not deleted), idempotent re-runs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from core.bootstrap import Container
from core.config import Settings
from core.domain.model import InboundMethod, MailboxKind, OutboundMethod, TrackingFilter
from core.names import MAILBOX_STATUS_TABLE, MAILBOXES_TABLE, ORG_SETTINGS_TABLE
from core.settings.crm_sync import CrmSyncService
from core.settings.store import TableMailboxDirectory
from emulators.dataverse.seed import demo_user_id
from local.azurite import Azurite
from tests.unit.settings.localstack import DOMAIN, LocalStack, start_local_stack

pytestmark = pytest.mark.integration

SUPPORT_QUEUE = "c0ffee00-0000-4000-8000-0000000000e1"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, azurite: Azurite) -> Iterator[LocalStack]:
    yield from start_local_stack(tmp_path_factory.mktemp("tls"), azurite)


@pytest.fixture
async def container(stack: LocalStack) -> AsyncIterator[Container]:
    c = Container(Settings(stack.fresh_values()))
    try:
        yield c
    finally:
        await c.close()


def service(c: Container) -> CrmSyncService:
    s = c.storage
    return CrmSyncService(c.dataverse, s.table(MAILBOXES_TABLE), s.table(ORG_SETTINGS_TABLE),
                          s.table(MAILBOX_STATUS_TABLE), page_size=2)  # tiny pages: paging is exercised


async def test_sync_copies_crm_and_overrides_survive(stack: LocalStack, container: Container) -> None:
    # no regarding user/queue -> a forward mailbox (isforwardmailbox is read-only, DefaultValue Yes: mailbox.md)
    sink = stack.dv("POST", "mailboxes", {"name": "CRM sink", "emailaddress": f"crm-sink@{DOMAIN}",
                                          "processanddeleteemails": True})
    sink_id = sink.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    sync = service(container)
    directory = TableMailboxDirectory.from_account(container.storage, ttl_seconds=0)
    try:
        report = await sync.run()
        assert set(report.added) >= {f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol", "dave", "support",
                                                                "crm-sink")}
        assert "emailrouter-app@" + DOMAIN not in report.added  # application users are not mailboxes
        assert not report.errors, report.errors
        assert "MaxAttachmentBytes" in report.org_changed

        alice = await directory.get_mailbox(f"alice@{DOMAIN}")
        bob = await directory.get_mailbox(f"bob@{DOMAIN}")
        carol = await directory.get_mailbox(f"carol@{DOMAIN}")
        support = await directory.get_mailbox(f"support@{DOMAIN}")
        crm_sink = await directory.get_mailbox(f"crm-sink@{DOMAIN}")
        assert alice and bob and carol and support and crm_sink
        assert alice.inbound_method is InboundMethod.INDIVIDUAL and alice.outbound_method is OutboundMethod.ROUTER
        assert str(alice.owner.id if alice.owner else "") == demo_user_id("alice")
        assert alice.mailbox_id is not None
        assert bob.inbound_method is InboundMethod.FORWARD and bob.forward_sink_address == f"crm-sink@{DOMAIN}"
        assert carol.inbound_method is InboundMethod.OUTLOOK and carol.tracking_filter is TrackingFilter.ALL
        assert support.kind is MailboxKind.QUEUE and support.queue_owner is not None
        assert crm_sink.kind is MailboxKind.FORWARD_SINK and crm_sink.delete_after_processing
        assert str(crm_sink.mailbox_id) == sink_id

        # The admin overrides alice; CRM changes carol, disables dave and drops the queue.
        await directory.set_overrides(f"alice@{DOMAIN}", {"Filter": "all", "Outbound": "none"})
        stack.dv("PATCH", f"systemusers({demo_user_id('carol')})", {"incomingemaildeliverymethod": 2})
        stack.dv("PATCH", f"systemusers({demo_user_id('dave')})", {"isdisabled": True})
        stack.dv("PATCH", f"systemusers({demo_user_id('alice')})", {"outgoingemaildeliverymethod": 1})
        stack.dv("DELETE", f"queues({SUPPORT_QUEUE})")
        stack.dv("PATCH", "organizations(c0ffee00-0000-4000-8000-0000000000d0)", {"maxuploadfilesize": 1048576})

        second = await sync.run()
        assert second.changed[f"carol@{DOMAIN}"] == ["CrmInbound"]
        assert second.changed[f"dave@{DOMAIN}"] == ["CrmDisabled"]
        assert second.changed[f"alice@{DOMAIN}"] == ["CrmOutbound"]
        assert second.disabled == [f"support@{DOMAIN}"]
        assert second.org_changed == ["MaxAttachmentBytes"]

        alice = await directory.get_mailbox(f"alice@{DOMAIN}")
        assert alice and alice.tracking_filter is TrackingFilter.ALL  # override survived the sync
        assert alice.outbound_method is OutboundMethod.NONE
        row = await directory.get_row(f"alice@{DOMAIN}")
        assert row and row["CrmOutbound"] == "outlook" and row["OverrideOutbound"] == "none"
        carol = await directory.get_mailbox(f"carol@{DOMAIN}")
        assert carol and carol.inbound_method is InboundMethod.INDIVIDUAL
        dave = await directory.get_mailbox(f"dave@{DOMAIN}")
        assert dave and not dave.enabled_for_incoming
        support = await directory.get_mailbox(f"support@{DOMAIN}")
        assert support is not None and not support.enabled_for_incoming and not support.enabled_for_outgoing
        assert (await directory.get_org_settings()).max_attachment_bytes == 1048576

        third = await sync.run()
        assert not third.added and not third.changed and not third.disabled and not third.org_changed
        status = await container.storage.table(MAILBOX_STATUS_TABLE).get("router", "crm-sync")
        assert status["Changed"] == 0 and status["LastRunOn"]
    finally:
        stack.dv("DELETE", f"mailboxes({sink_id})")
