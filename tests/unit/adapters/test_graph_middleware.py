"""core.adapters.graph's middleware chain: the handlers that act for this adapter, acting as the SDK's own do."""

from __future__ import annotations

import httpx
import pytest
from kiota_http.middleware import ParametersNameDecodingHandler, RedirectHandler, UserAgentHandler
from msgraph_core.middleware import GraphTelemetryHandler

from core.adapters.graph import _middleware

URLS = [
    "https://graph.microsoft.com/v1.0/users/a%40b.example/messages?$select=id",
    "https://graph.microsoft.us/v1.0/me",
    "https://dod-graph.microsoft.us/beta/users",
    "https://microsoftgraph.chinacloudapi.cn/v1.0/users",
    "https://GRAPH.microsoft.com:443/v1.0/users",
    "https://graph.microsoft.com:8443/v1.0/users",
    "http://graph.microsoft.com/v1.0/users",
    "https://127.0.0.1:8443/v1.0/users",
    "https://graph.test/v1.0/users",
]


def test_chain_keeps_the_acting_handlers_in_the_default_order() -> None:
    chain = _middleware()
    assert [type(h).__mro__[1] if type(h).__module__ == "core.adapters.graph" else type(h) for h in chain] == [
        RedirectHandler, ParametersNameDecodingHandler, UserAgentHandler, GraphTelemetryHandler]


@pytest.mark.parametrize("url", URLS)
def test_telemetry_goes_to_the_same_hosts_as_the_sdks_check(url: str) -> None:
    ours = _middleware()[-1]
    assert ours.is_graph_url(httpx.URL(url)) == GraphTelemetryHandler().is_graph_url(httpx.URL(url))


@pytest.mark.parametrize("query", ["%24select=id&%24top=5", "$select=id&$filter=a%20eq%201", "%24filter=x%2Ey",
                                   "a%2Db=1&c=%24d", ""])
async def test_parameter_names_decoded_as_the_sdk_does(query: str) -> None:
    sent: list[httpx.Request] = []

    class _Last:
        async def send(self, request: httpx.Request, transport: object) -> httpx.Response:
            sent.append(request)
            return httpx.Response(200)

    async def through(handler: ParametersNameDecodingHandler) -> str:
        handler.next = _Last()  # type: ignore[assignment]
        await handler.send(httpx.Request("GET", f"https://graph.test/v1.0/users?{query}"), httpx.AsyncHTTPTransport())
        return str(sent[-1].url)

    assert await through(_middleware()[1]) == await through(ParametersNameDecodingHandler())
