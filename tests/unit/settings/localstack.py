"""The local services for the settings/CLI integration tests: identity + Dataverse + Graph emulators over TLS, and
app settings pointing at them and at Azurite (a unique TABLE_PREFIX per stack, so tests never share rows).

Lives here (not in conftest) because only the settings and CLI tests use it; ``tests/integration/test_settings_*``
and ``test_cli*`` import it.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msal
import pytest

from emulators.common import demo
from emulators.common.server import RunningServer
from emulators.common.tls import TlsMaterial, client_env, ensure_tls
from emulators.dataverse.testing import RunningDataverse, start_dataverse
from emulators.graph.testing import RunningGraph, start_graph
from emulators.identity.testing import start_identity
from local.azurite import Azurite

ODATA = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0", "If-None-Match": "null"}
DOMAIN = demo.TENANT_DOMAIN


@dataclass
class LocalStack:
    tls: TlsMaterial
    identity: RunningServer
    dataverse: RunningDataverse
    graph: RunningGraph
    values: dict[str, str]

    def ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.tls.bundle))

    def dv_token(self) -> str:
        app = msal.ConfidentialClientApplication(
            demo.APP_CLIENT_ID, client_credential=demo.APP_CLIENT_SECRET,
            authority=f"{self.identity.url}/{demo.TENANT_ID}", instance_discovery=False, verify=str(self.tls.bundle))
        result = app.acquire_token_for_client(scopes=[f"{self.dataverse.url}/.default"])
        assert "access_token" in result, result
        return str(result["access_token"])

    def dv(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """A raw Web API call (the test's own view of CRM, independent of the product's client)."""
        response = httpx.request(method, f"{self.dataverse.api_url}/{path}", json=body, timeout=30,
                                 verify=self.ssl(),
                                 headers={**ODATA, "Authorization": f"Bearer {self.dv_token()}"})
        assert response.status_code < 400, response.text
        return response

    def graph_emulator(self, method: str, path: str, body: Any = None) -> httpx.Response:
        response = httpx.request(method, f"{self.graph.url}/_emulator/{path}", json=body, timeout=30,
                                 verify=self.ssl())
        assert response.status_code < 400, response.text
        return response

    def fresh_values(self) -> dict[str, str]:
        """App settings with a new TABLE_PREFIX (an empty set of tables)."""
        return {**self.values, "TABLE_PREFIX": f"t{uuid.uuid4().hex[:12]}"}


def start_local_stack(tmp: Path, azurite: Azurite) -> Iterator[LocalStack]:
    tls = ensure_tls(tmp)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in client_env(tls).items():
            mp.setenv(name, value)
        identity = start_identity(tmp)
        dataverse = start_dataverse(tmp, identity.url)
        graph = start_graph(tmp, identity.url)
        values = {
            "AzureWebJobsStorage": azurite.connection_string,
            "TABLE_PREFIX": f"t{uuid.uuid4().hex[:12]}",
            "GRAPH_TENANT_ID": demo.TENANT_ID,
            "GRAPH_CLIENT_ID": demo.APP_CLIENT_ID,
            "GRAPH_CLIENT_SECRET": demo.APP_CLIENT_SECRET,
            "GRAPH_AUTHORITY_HOST": identity.url,
            "GRAPH_BASE_URL": graph.base_url,
            "DATAVERSE_URL": dataverse.url,
        }
        try:
            yield LocalStack(tls, identity, dataverse, graph, values)
        finally:
            graph.stop()
            dataverse.stop()
            identity.stop()
