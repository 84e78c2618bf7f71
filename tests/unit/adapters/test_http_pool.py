"""core.adapters.http_pool: the pool's idle-connection check answers as httpcore's does, with one socket lookup."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import httpcore
import httpx

from core.adapters.http_pool import _Backend, _Stream, cheap_readable_checks


class _Inner(httpcore.AsyncNetworkStream):
    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self.lookups = 0
        self.closed = False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return b"data"[:max_bytes]

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        return None

    async def aclose(self) -> None:
        self.closed = True

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:  # noqa: ASYNC109
        return _Inner(self.sock)

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            self.lookups += 1
            return self.sock
        return f"inner:{info}"


def test_is_readable_polls_the_socket_looked_up_once() -> None:
    left, right = socket.socketpair()
    try:
        inner = _Inner(left)
        stream = _Stream(inner)
        assert stream.get_extra_info("is_readable") is False
        right.sendall(b"x")  # the server "closed" / sent: readable, as httpcore's own check says
        assert stream.get_extra_info("is_readable") is True
        assert inner.lookups == 1
        assert stream.get_extra_info("ssl_object") == "inner:ssl_object"
        left.close()  # a closed socket counts as readable (its next read is the end)
        assert stream.get_extra_info("is_readable") is True
    finally:
        right.close()


def test_no_socket_is_readable_as_in_httpcore() -> None:
    assert _Stream(_Inner(None)).get_extra_info("is_readable") is True


def test_stream_passes_everything_else_through() -> None:
    async def run() -> None:
        inner = _Inner(None)
        stream = _Stream(inner)
        assert await stream.read(2) == b"da"
        await stream.write(b"x")
        tls = await stream.start_tls(ssl.create_default_context(), "example.test")
        assert isinstance(tls, _Stream)
        await stream.aclose()
        assert inner.closed

    asyncio.run(run())


def test_wraps_the_pools_backend_once_and_leaves_other_transports_alone() -> None:
    client = httpx.AsyncClient()
    cheap_readable_checks(client)
    cheap_readable_checks(client)
    backend = client._transport._pool._network_backend  # type: ignore[attr-defined]
    assert isinstance(backend, _Backend) and not isinstance(backend.inner, _Backend)
    mocked = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(204)))
    assert cheap_readable_checks(mocked) is mocked


def test_requests_still_work_through_the_wrapped_backend() -> None:
    """A real exchange over loopback TCP with keep-alive: the second request reuses the idle connection after the
    pool's readability check."""
    async def run() -> None:
        requests = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal requests
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
                await writer.drain()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with cheap_readable_checks(httpx.AsyncClient()) as client:
                for _ in range(3):
                    response = await client.get(f"http://127.0.0.1:{port}/")
                    assert response.text == "ok"
                assert len(client._transport._pool.connections) == 1  # type: ignore[attr-defined]
        finally:
            server.close()
        assert requests == 3

    asyncio.run(run())
