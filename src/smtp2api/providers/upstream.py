"""The upstream address guard (design §8): the shared HTTP client never connects to a link-local
or cloud-metadata address, also when a provider's host name *resolves* to one at request time.

The check sits where connections are made, in httpcore's network backend or in aiohttp's
resolver (whichever transport ``transport.py`` chose): the host is resolved once, every
address is checked, and the connection goes to a checked address, so a DNS answer that changes
between the check and the connect (rebinding) cannot slip through. TLS still verifies the
certificate against the host name. A URL whose host is an IP address is checked per request.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpcore
import httpx
from httpcore import AsyncNetworkBackend, AsyncNetworkStream

from smtp2api.config import refused_upstream_address

Resolver = Callable[[str, int], Awaitable[list[str]]]
SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class UpstreamRefused(httpcore.ConnectError, OSError):
    """The host resolves to an address the gateway never contacts; nothing was sent.
    (An OSError too: aiohttp passes resolver errors on only as OSError.)"""


def refusal_in(exc: BaseException) -> UpstreamRefused | None:
    """The ``UpstreamRefused`` behind a transport error, if that is what it was."""
    seen: BaseException | None = exc
    for _ in range(6):
        if isinstance(seen, UpstreamRefused):
            return seen
        seen = (seen.__cause__ or seen.__context__) if seen is not None else None
    return None


def _check(host: str, addresses: Iterable[str]) -> None:
    for address in addresses:
        reason = refused_upstream_address(address)
        if reason is not None:
            raise UpstreamRefused(f"{host} resolves to {address}: {reason}")


async def system_resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host``, in the resolver's order, each once."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(AsyncNetworkBackend):
    """httpcore network backend: resolve, refuse forbidden addresses, connect to a checked one.

    A host with any refused address is refused as a whole: a name that mixes a public address
    with the metadata service is not a provider. The allowed addresses are tried in order.
    """

    def __init__(
        self, inner: AsyncNetworkBackend | None = None, resolve: Resolver | None = None
    ) -> None:
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()
        self._resolve = resolve  # None: ``system_resolve``, looked up at each call

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await (self._resolve or system_resolve)(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:  # socket.gaierror: the cause names "DNS lookup failed"
            raise httpcore.ConnectError(f"cannot resolve {host}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no address")
        _check(host, addresses)
        options = list(socket_options) if socket_options is not None else None
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address,
                    socket_options=options,
                )  # fmt: skip
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[SocketOption] | None = None,
    ) -> AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _aiohttp_resolver(resolve: Resolver | None) -> Any:
    """An aiohttp resolver that refuses what ``refused_upstream_address`` refuses; its results
    are what aiohttp connects to (and caches), so nothing unchecked is ever dialled."""
    import aiohttp

    class GuardedResolver(aiohttp.abc.AbstractResolver):
        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[aiohttp.abc.ResolveResult]:
            addresses = await (resolve or system_resolve)(host, port)
            _check(host, addresses)
            return [_result(host, address, port) for address in addresses]

        async def close(self) -> None:
            """Nothing to release: lookups run in the loop's default executor."""

    def _result(host: str, address: str, port: int) -> aiohttp.abc.ResolveResult:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return {"hostname": host, "host": address, "port": port, "family": family,
                "proto": 0, "flags": socket.AI_NUMERICHOST}  # fmt: skip

    return GuardedResolver()


@functools.lru_cache(maxsize=256)
def _literal_refused(host: str) -> bool:
    # Per host, not per request: parsing an address is most of the hook's cost.
    return refused_upstream_address(host) not in (None, "not an IP address")


async def _check_literal(request: httpx.Request) -> None:
    """Request hook: a URL whose host is an IP address is checked here (no resolver sees it)."""
    host = request.url.host
    if not _literal_refused(host):
        return
    try:
        _check(host, [host])
    except UpstreamRefused as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc


def guard_client(client: httpx.AsyncClient, resolve: Resolver | None = None) -> None:
    """Guard every connection ``client`` makes (design §8) and ask for uncompressed answers
    (a small compressed error body must not inflate to megabytes in memory).

    ``resolve`` replaces DNS (default: ``system_resolve``, looked up at each call). httpx and
    httpcore offer no public hook for the backend of a client's pools, so this sets a pool's
    ``_network_backend`` (read each time a connection is made; httpcore 1.0), or
    ``AiohttpTransport.resolver``; an unknown transport is an error, never an unguarded client.
    """
    transports = [client._transport, *client._mounts.values()]
    for transport in transports:
        if transport is None:
            continue  # a mount that disables proxying for some hosts
        pool = getattr(transport, "_pool", None)
        if isinstance(pool, httpcore.AsyncConnectionPool):
            current = pool._network_backend
            if not isinstance(current, GuardedBackend):
                pool._network_backend = GuardedBackend(current, resolve)
        elif hasattr(transport, "resolver") and getattr(transport, "_session", True) is None:
            transport.resolver = _aiohttp_resolver(resolve)
        else:
            raise TypeError(f"cannot guard upstream connections of {type(transport).__name__}")
    if _check_literal not in client.event_hooks["request"]:
        client.event_hooks["request"].append(_check_literal)
    client.headers["Accept-Encoding"] = "identity"
