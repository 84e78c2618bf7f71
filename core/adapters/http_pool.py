"""A cheaper idle-connection check for the httpx clients' connection pools (CPU, not behaviour).

Before every request it assigns, and after every response it releases, httpcore's connection pool asks each idle
keep-alive connection whether the server has closed it (``has_expired`` -> ``get_extra_info("is_readable")``). On
asyncio that goes through anyio's TLS stream, which answers by building its whole typed-attribute mapping (a dict of
a dozen closures, merged with the socket stream's, one ``getpeername`` system call included) only to read the raw
socket out of it, then polls that socket. With the Dataverse pool (up to 32 connections) and Graph's, that was tens
of those per tracked email, most of it rebuilding the same mapping.

:func:`cheap_readable_checks` wraps the pool's network backend so each stream looks its raw socket up once, when
the question is first asked, and then polls it directly: the socket of a stream never changes (``start_tls`` makes
a new stream, wrapped again), and the poll is the one httpcore makes (``httpcore._utils.is_socket_readable``), so
the answers are the same. Everything else passes through unchanged.

It reaches into httpx/httpcore internals (``transport._pool._network_backend``); where they are not what it
expects (another transport, a mock, other versions), it leaves the client alone.
"""

from __future__ import annotations

import ssl
import typing
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx
from httpcore._utils import is_socket_readable

__all__ = ["cheap_readable_checks"]

_UNSET: Any = object()


# The signatures are httpcore's, timeout parameters included (hence the ASYNC109 exemptions).
class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        self._socket: Any = _UNSET

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:  # noqa: ASYNC109
        return _Stream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            if self._socket is _UNSET:
                self._socket = self._stream.get_extra_info("socket")
            return is_socket_readable(self._socket)
        return self._stream.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        self.inner = backend

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: typing.Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        return _Stream(await self.inner.connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                                    socket_options=socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: typing.Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        return _Stream(await self.inner.connect_unix_socket(path, timeout=timeout, socket_options=socket_options))

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def _transports(client: httpx.AsyncClient) -> Iterable[Any]:
    yield getattr(client, "_transport", None)
    yield from (getattr(client, "_mounts", None) or {}).values()


def cheap_readable_checks(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """Wrap the network backend of each connection pool of ``client`` (see the module docstring); returns it."""
    for transport in _transports(client):
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(pool, httpcore.AsyncConnectionPool) and isinstance(backend, httpcore.AsyncNetworkBackend) \
                and not isinstance(backend, _Backend):
            pool._network_backend = _Backend(backend)
    return client
