"""The webhook service over real Azure Storage (Azurite): subscription lookup + base64 enqueue."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from azure.storage.queue import QueueClient, TextBase64DecodePolicy

from core.adapters.state import SubscriptionRecord
from core.bootstrap import Container
from core.config import Settings
from core.names import INBOUND_QUEUE
from core.services.webhook import handle_change_notifications
from core.work_items import InboundItem
from local.azurite import Azurite

pytestmark = pytest.mark.integration
TENANT = "c0ffee00-0000-4000-8000-000000000001"


async def test_notification_reaches_inbound_queue(azurite: Azurite) -> None:
    prefix = "wh" + uuid.uuid4().hex[:8]
    settings = Settings(env={"AzureWebJobsStorage": azurite.connection_string, "TABLE_PREFIX": prefix,
                             "GRAPH_TENANT_ID": TENANT})
    container = Container(settings)
    record = SubscriptionRecord(id=str(uuid.uuid4()), mailbox="alice@contoso.example", folder="inbox",
                                client_state="cs-" + uuid.uuid4().hex * 2, tenant_id=TENANT,
                                resource="users/alice@contoso.example/mailFolders('inbox')/messages",
                                expires=datetime.now(UTC) + timedelta(days=2))
    await container.subscription_directory.put(record)
    body = json.dumps({"value": [{
        "subscriptionId": record.id, "clientState": record.client_state, "changeType": "created",
        "tenantId": TENANT, "resource": "Users/x/Messages/AAA=",
        "subscriptionExpirationDateTime": "2030-01-01T00:00:00Z",
        "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "id": "AAA="},
    }]}).encode()
    queue = QueueClient.from_connection_string(azurite.connection_string, INBOUND_QUEUE,
                                               message_decode_policy=TextBase64DecodePolicy())
    try:
        queue.clear_messages()
    except Exception:
        pass
    result = await handle_change_notifications(body, directory=container.subscription_directory,
                                               queue=container.work_queue, tenant_id=TENANT, max_bytes=1 << 20)
    assert result.status == 202 and result.accepted == 1
    items = [InboundItem.from_json(m.content) for m in queue.receive_messages(max_messages=32)]
    assert any(i.message_id == "AAA=" and i.mailbox == "alice@contoso.example" for i in items)
    await container.storage.close()
