"""A generic third-party client against the emulator: Microsoft's ``powerplatform-dataverse-client`` (1.1.0) with an
azure-identity ``ClientSecretCredential`` pointed at the identity emulator, trusting the local CA.

What the SDK needs from the emulator (read from its source): ``EntityDefinitions?$select=LogicalName,EntitySetName,
PrimaryIdAttribute&$filter=LogicalName eq '<table>'`` to resolve entity sets, the picklist metadata cast
``EntityDefinitions(LogicalName='x')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata`` whenever a payload
has string values, the ``OData-EntityId`` header on create, ``If-Match: *`` PATCH, and ``@odata.nextLink`` paging.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import pytest
from azure.identity import ClientSecretCredential

from emulators.common import demo
from tests.integration import test_dataverse_emulator as base
from tests.integration.test_dataverse_emulator import Api, Stack

# Reuse the module-scoped identity + Dataverse stack and the per-test reset of the main emulator test module.
stack = base.stack
api = base.api

pytestmark = pytest.mark.integration

DataverseClient = pytest.importorskip("PowerPlatform.Dataverse.client").DataverseClient
HttpError = pytest.importorskip("PowerPlatform.Dataverse.core.errors").HttpError


def _credential(running: Stack) -> ClientSecretCredential:
    # azure-identity builds https://<authority>/<tenant>; the identity emulator is a custom authority, so instance
    # discovery (a call to login.microsoftonline.com) must be off.
    return ClientSecretCredential(demo.TENANT_ID, demo.APP_CLIENT_ID, demo.APP_CLIENT_SECRET,
                                  authority=urlsplit(running.identity.url).netloc, disable_instance_discovery=True,
                                  connection_verify=str(running.tls.bundle))


def test_sdk_create_read_query_update_contact(api: Api) -> None:
    running = api.stack
    with DataverseClient(running.dataverse.url, _credential(running)) as client:
        cid = client.records.create("contact", {"firstname": "Sam", "lastname": "Sdk",
                                                "emailaddress1": "sam.sdk@example.org"})
        uuid.UUID(cid)
        got = client.records.get("contact", cid, select=["fullname", "emailaddress1"])
        assert got["fullname"] == "Sam Sdk" and got["emailaddress1"] == "sam.sdk@example.org"
        pages = list(client.records.get("contact", select=["contactid", "lastname"],
                                        filter="emailaddress1 eq 'SAM.SDK@example.org'", page_size=1))
        rows = [r for page in pages for r in page]
        assert [r["contactid"] for r in rows] == [cid]
        client.records.update("contact", cid, {"lastname": "Updated", "telephone1": "555-0100"})
        again = client.records.get("contact", cid, select=["lastname", "telephone1"])
        assert (again["lastname"], again["telephone1"]) == ("Updated", "555-0100")
        # PATCH with If-Match: * never creates: a missing id is a 404 the SDK surfaces as HttpError
        with pytest.raises(HttpError) as exc:
            client.records.update("contact", str(uuid.uuid4()), {"lastname": "ghost"})
        assert exc.value.status_code == 404
        client.records.delete("contact", cid)
    log = api.emulator("GET", "requests").json()["value"]
    assert any(e["path"].startswith("/api/data/v9.2/EntityDefinitions") for e in log)
