"""Queue items against the strict Dataverse emulator through the real adapter (DataverseQueueItems): the binds the
org declares, one item per email per queue (a repeat is a duplicate key), the queues an email already sits in, and
a refused item that does not hold back the others."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from core.bootstrap import Container
from core.config import Settings
from core.domain.model import CrmRecordRef
from core.domain.queue_items import QueueItemPlan, QueueItemReason, queue_item_id_for
from core.services.queue_items_crm import DataverseQueueItems
from local.azurite import Azurite
from tests.unit.settings.localstack import LocalStack, start_local_stack

pytestmark = pytest.mark.integration

SUPPORT = "c0ffee00-0000-4000-8000-0000000000e1"  # the demo seed's Support queue


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


def plan(email: uuid.UUID, queue: str) -> QueueItemPlan:
    return QueueItemPlan(queue_item_id_for(email, uuid.UUID(queue)), CrmRecordRef("queue", uuid.UUID(queue)), email,
                         QueueItemReason.SYNCHRONIZING_MAILBOX)


async def test_one_item_per_email_per_queue_and_a_refusal_holds_nothing_back(container: Container,
                                                                              stack: LocalStack) -> None:
    email = uuid.uuid4()
    await container.dataverse.create("emails", {"activityid": str(email), "subject": "Invoice", "directioncode": False})
    gateway = DataverseQueueItems(container.dataverse)
    assert (await gateway.tracked_email_queues(email)).queues == frozenset()
    missing_queue = str(uuid.uuid4())
    first = await gateway.create_queue_items([plan(email, SUPPORT), plan(email, missing_queue)])
    assert first.created == [uuid.UUID(SUPPORT)]
    assert list(first.refused) == [uuid.UUID(missing_queue)] and "no longer exists" in first.refused[
        uuid.UUID(missing_queue)]
    again = await gateway.create_queue_items([plan(email, SUPPORT)])
    assert again.existing == [uuid.UUID(SUPPORT)] and again.created == []
    assert (await gateway.tracked_email_queues(email)).queues == {uuid.UUID(SUPPORT)}
    rows = stack.dv("GET", f"queueitems?$filter=_objectid_value eq {email}"
                           "&$select=queueitemid,_queueid_value,enteredon,statecode").json()["value"]
    assert len(rows) == 1 and rows[0]["_queueid_value"] == SUPPORT and rows[0]["enteredon"]
    assert rows[0]["queueitemid"] == str(queue_item_id_for(email, uuid.UUID(SUPPORT)))
